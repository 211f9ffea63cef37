"""Write this folder's compressed audio files and FFmpeg's decodes of them (``reference.npz``).

The reference pipeline decodes audio with ``torchaudio.load``: FFmpeg's decoders where FFmpeg is
installed (through torchcodec, as for the CLaMP 3 vectors); this project decodes with libsndfile
(``soundfile``). ``tests/test_audio.py`` checks
that the two give the same samples on these files. Needs PyAV (``pip install av``: FFmpeg's
libraries, the demuxer and decoders torchcodec drives), which is not a dependency of the project;
run it from the repository root only to regenerate the files:

    python tests/data/ffmpeg_decodes/make_reference.py

The sources are the CLaMP 3 vectors' FluidSynth renderings of music21 scores. A decode is kept as
its length and a fingerprint small enough to track: the first and the last 512 frames, and the
mean of every 256 frames, per channel (float32, FFmpeg's float output, as torchcodec returns it).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile

HERE = Path(__file__).resolve().parent
AUDIO = HERE.parent / "vectors_clamp3" / "inputs" / "audio"
EDGE = 512
BLOCK = 256


def fingerprint(frames: np.ndarray) -> dict:
    """``frames`` [channels, n] float32 → the arrays the test compares."""
    n = frames.shape[1] // BLOCK * BLOCK
    return {"head": frames[:, :EDGE], "tail": frames[:, -EDGE:],
            "block_means": frames[:, :n].reshape(frames.shape[0], -1, BLOCK).mean(axis=2, dtype=np.float64).astype(np.float32)}


def ffmpeg_decode(path: Path):
    import av

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        chunks = []
        for frame in container.decode(stream):
            assert frame.format.name == "fltp", frame.format.name  # FFmpeg's float decoders, no conversion
            chunks.append(frame.to_ndarray())
        return np.concatenate(chunks, axis=1).astype(np.float32, copy=False), stream.rate, stream.codec_context.name


def lame_mp3(path: Path, samples: np.ndarray, rate: int, bit_rate: int, xing: bool, id3: bool) -> None:
    """MP3 through FFmpeg's muxer and LAME, with or without the Xing/LAME header (gapless info)."""
    import av

    layout = "mono" if samples.shape[1] == 1 else "stereo"
    options = {"write_xing": "1" if xing else "0", "write_id3v1": "1" if id3 else "0", "id3v2_version": "4" if id3 else "0"}
    with av.open(str(path), "w", format="mp3", options=options) as container:
        if id3:
            container.metadata["title"] = "Banish Misfortune"
        stream = container.add_stream("libmp3lame", rate=rate, layout=layout)
        stream.bit_rate = bit_rate
        planar = np.ascontiguousarray(samples.T.astype(np.float32))
        for start in range(0, planar.shape[1], 1152):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planar[:, start:start + 1152]), format="fltp", layout=layout)
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def resampled(samples: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
    from clamp2.extraction.audio import resample

    return np.stack([resample(np.ascontiguousarray(channel), rate, new_rate) for channel in samples.T], axis=1)


def main() -> None:
    import av

    chorale, chorale_rate = soundfile.read(AUDIO / "bwv26.6_44k1_stereo_s16.wav", dtype="float32", always_2d=True)
    jig, jig_rate = soundfile.read(AUDIO / "banish_misfortune_22k05_mono_s16.wav", dtype="float32", always_2d=True)
    jig = jig[int(2.0 * jig_rate):int(3.5 * jig_rate)]
    made = {
        # MPEG-1 Layer III, Xing/LAME header: the decoders trim the encoder delay and padding.
        "lame_44k1_stereo.mp3": lambda p: lame_mp3(p, chorale, chorale_rate, 128000, xing=True, id3=False),
        # MPEG-2 and MPEG-2.5, no Xing header (nothing to trim by), ID3v2.4 and ID3v1 tags.
        "noxing_id3_16k_mono.mp3": lambda p: lame_mp3(p, resampled(jig, jig_rate, 16000), 16000, 32000, xing=False, id3=True),
        "noxing_8k_mono.mp3": lambda p: lame_mp3(p, resampled(jig, jig_rate, 8000), 8000, 24000, xing=False, id3=False),
        # libsndfile's own MP3 writer (LAME), as the quick start writes MP3; variable bit rate.
        "libsndfile_vbr_22k05_mono.mp3": lambda p: soundfile.write(str(p), jig, jig_rate, format="MP3",
                                                                   bitrate_mode="VARIABLE"),
        # Ogg Vorbis written by libsndfile (libvorbis); FFmpeg decodes it with its own Vorbis decoder.
        "vorbis_44k1_stereo.ogg": lambda p: soundfile.write(str(p), chorale, chorale_rate, format="OGG", subtype="VORBIS"),
    }
    arrays, about = {}, {"made_with": f"PyAV {av.__version__}, FFmpeg {av.ffmpeg_version_info}",
                         "edge_frames": EDGE, "block_frames": BLOCK, "files": {}}
    for name, make in made.items():
        path = HERE / name
        make(path)
        frames, rate, codec = ffmpeg_decode(path)
        for key, value in fingerprint(frames).items():
            arrays[f"{name}/{key}"] = value
        about["files"][name] = {"codec": codec, "rate": rate, "channels": frames.shape[0], "frames": frames.shape[1]}
    np.savez_compressed(HERE / "reference.npz", **arrays)
    (HERE / "reference.json").write_text(json.dumps(about, indent=1) + "\n")


if __name__ == "__main__":
    main()
