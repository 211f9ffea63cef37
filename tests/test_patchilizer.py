"""M3 patch tokenizer (SPEC §4): the reference's patches for real pieces, and every edge case."""

import json
import random

import numpy as np
import pytest

from clamp2.patchilizer import M3Patchilizer, split_bars, truncate

P = M3Patchilizer(patch_size=64, patch_length=512)


def ids(s):
    return P.patch_to_ids(s)


@pytest.mark.parametrize("kind,name", [("abc", "bwv10.7.abc"), ("abc", "airds_tune3.abc"),
                                       ("mtf", "bwv10.7.mtf"), ("mtf", "handmade.mtf")])
def test_reference_patches(vectors, kind, name):
    text = (vectors / "extract_in" / kind / name).read_text(encoding="utf-8")
    expected = json.loads((vectors / "expected" / "patches" / kind / f"{name}.json").read_text())
    assert P.encode(text, add_special_patches=True) == expected


def test_patch_ids_bos_eos_pad_and_cut():
    assert ids("ab") == [1, 97, 98, 2] + [0] * 60
    long = ids("x" * 100)
    assert len(long) == 64 and long[0] == 1 and long[1:] == [120] * 63  # eos cut off
    assert ids("x" * 62)[-1] == 2 and ids("x" * 63)[-1] == 120


def test_special_patches():
    patches = P.encode("K:C\n", add_special_patches=True)
    assert patches[0] == [1] * 64
    assert patches[-1] == [1] + [2] * 63
    assert P.decode(patches[1:-1]) == "K:C\n"


def test_mtf_lines_group_by_type_prefix_and_length():
    text = "ticks_per_beat 480\nnote_on 0 0 60 80\nnote_on 0 0 64 80\nnote_off 10 0 60 0\nnote_on 0 0 67 80"
    patches = P.patch_strings(text)
    assert patches == ["ticks_per_beat 480\n", "note_on 0 0 60 80\t0 0 64 80\n", "note_off 10 0 60 0\n", "note_on 0 0 67 80"]


def test_mtf_prefix_test_is_plain_string_prefix():
    # "note" is a prefix of the current patch "note_on ...", so a (fictional) type "note" joins it.
    patches = P.patch_strings("ticks_per_beat 1\nnote_on 1 2\nnote 3 4\n")
    assert patches == ["ticks_per_beat 1\n", "note_on 1 2\t3 4\n"]


def test_mtf_patch_length_limit():
    line = "note_on 0 0 60 80\n"  # values "0 0 60 80\n" are 10 chars
    text = "ticks_per_beat 1\n" + line * 10
    patches = P.patch_strings(text)[1:]
    assert all(len(p) <= 62 for p in patches)
    # 18 + 5 joins of 11 chars = 73 > 62: the first patch holds exactly the joins that fit.
    first = patches[0]
    assert len(first) + 10 > 62 and first.count("\t") == (62 - 18) // 11
    assert "".join(p.replace("\t", "\nnote_on ") for p in patches) == line * 10


@pytest.mark.parametrize("barline", ["|:", "::", ":|", "[|", "||", "|]", "|"])
def test_each_barline_token_ends_a_bar(barline):
    assert P.patch_strings(f"ab{barline}cd{barline}\n") == [f"ab{barline}", f"cd{barline}\n"]


def test_barline_tokens_are_tried_longest_first():
    assert split_bars("a||b|]c:|d\n") == ["a||", "b|]", "c:|"]
    assert split_bars("|:abc|\n") == ["|:abc|"]


def test_leading_barline_glued_to_first_bar():
    assert P.patch_strings("|abc|def|\n") == ["|abc|", "def|\n"]


def test_last_bar_without_barline_is_dropped():
    # The reference pairs (text, barline); the trailing unbarred piece is dropped and the
    # newline goes onto the last complete bar.
    assert P.patch_strings("abc|def\n") == ["abc|\n"]
    assert P.patch_strings("abc def\n") == []
    assert P.patch_strings("abc|") == ["abc|\n"]  # last line without newline still gets one


def test_interleaved_line_gives_one_patch_per_voice_bar():
    assert P.patch_strings("[V:1]abc|[V:2]def|\n") == ["[V:1]abc|", "[V:2]def|\n"]


def test_info_field_and_directive_lines_are_single_patches():
    text = "X:1\nT:A|B title\n%%score 1 | 2\nV:1 treble\n%comment|x|\nK:D\n"
    patches = P.patch_strings(text)
    assert patches[:5] == ["X:1\n", "T:A|B title\n", "%%score 1 | 2\n", "V:1 treble\n", "%comment|"]
    assert patches[-1] == "K:D\n"
    assert P.patch_strings("w|x\n") == ["w|\n"]  # one char before a barline is music, not a field


def test_non_ascii_input_is_transliterated():
    patches = P.encode("T:Dvořák Ünïcode\nK:C\n")
    assert P.decode(patches) == "T:Dvorak Unicode\nK:C\n"
    assert all(0 <= i < 128 for p in patches for i in p)
    mtf = P.patch_strings("ticks_per_beat 1\ntrack_name Caf\\xe9 0\n")
    assert mtf[1] == "track_name Caf\\xe9 0\n"  # MTF escapes are ASCII already


def test_empty_input_has_only_special_patches():
    assert P.encode("") == []
    assert len(P.encode("", add_special_patches=True)) == 2


def test_truncation_modes():
    items = list(range(10))
    assert truncate(items, 4, "head") == [0, 1, 2, 3]
    assert truncate(items, 4, "tail") == [6, 7, 8, 9]
    starts = {truncate(items, 4, "middle", random.Random(s))[0] for s in range(200)}
    assert starts == set(range(1, 7))  # a middle window starts at >= 1 and ends inside
    assert truncate(items, 20, "tail") == items
    with pytest.raises(ValueError):
        truncate(items, 4, "sideways")


def test_encode_truncation_head_and_random():
    short = M3Patchilizer(patch_size=64, patch_length=5)
    text = "".join(f"a{i}|" for i in range(20)) + "\n"
    head = short.encode(text, add_special_patches=True, truncate_patches=True)
    assert len(head) == 5 and head[0] == [1] * 64 and short.decode(head[1:]) == "a0|a1|a2|a3|"
    tail = short.encode(text, add_special_patches=True, truncate_patches=True, truncate_mode="tail")
    assert tail[-1] == [1] + [2] * 63
    seen = {tuple(map(tuple, short.encode(text, True, True, random_truncate=True, rng=random.Random(s))))[0] for s in range(60)}
    assert len(seen) > 3  # head, tail and several middle windows are all drawn
    untouched = short.encode(text, add_special_patches=True)
    assert len(untouched) == 22


def test_array_path_equals_the_per_character_ids(vectors):
    """encode_array (bytes per patch) = patch_to_ids per patch, on real pieces and the cut/pad edges."""
    texts = [path.read_text(encoding="utf-8") for path in sorted((vectors / "extract_in").rglob("*"))
             if path.suffix in (".abc", ".mtf")]
    assert len(texts) >= 4
    texts += ["K:C\n" + "x" * n + "|\n" for n in (0, 60, 61, 62, 63, 100)] + ["", "T:Dvořák\nK:C\nabc|\n"]
    for patch_size in (64, 16):
        patchilizer = M3Patchilizer(patch_size=patch_size, patch_length=8)
        for text in texts:
            for special in (False, True):
                strings = patchilizer.patch_strings(text)
                if special:
                    bos_patch, eos_patch = patchilizer.special_patch_strings()
                    strings = [bos_patch, *strings, eos_patch]
                expected = [patchilizer.patch_to_ids(p) for p in strings]
                array = patchilizer.encode_array(text, add_special_patches=special)
                assert array.dtype == np.uint8 and array.shape == (len(expected), patch_size)
                assert array.tolist() == expected
                assert patchilizer.encode(text, add_special_patches=special) == expected
    # Code points past ASCII (not from patch_strings) keep the per-character ids.
    assert P.patches_to_array(["é|"]).tolist() == [ids("é|")]


@pytest.mark.parametrize("barline", ["|]", "|", ":|"])
def test_a_final_lone_barline_without_newline_gives_no_patch(barline):
    # With its newline the line glues to nothing and gives no patch, in the reference too; without it the
    # reference's split_bars raises IndexError (a file whose last line is "|]"): read as with the newline.
    body = f"X:1\nK:C\nabc|\n{barline}"
    assert split_bars(barline) == []
    assert P.patch_strings(body) == P.patch_strings(body + "\n") == ["X:1\n", "K:C\n", "abc|\n"]


# -- found by a mutation audit: each fails on a plausible one-line bug the suite missed -----------------


def test_mtf_join_that_fills_the_patch_exactly_is_kept():
    values = "x" * 57 + "\n"  # len("a 1\n") + len(values) == 62 == patch_size - 2: the reference joins (<=)
    assert P.patch_strings("ticks_per_beat 1\na 1\na " + values) == ["ticks_per_beat 1\n", "a 1\t" + values]
    assert P.encode("ticks_per_beat 1\na 1\na " + values)[1][-1] == 2  # bos + 62 chars + eos: no cut


def test_truncation_draws_once_even_without_random_truncate():
    short = M3Patchilizer(patch_size=64, patch_length=5)
    text = "".join(f"a{i}|" for i in range(20)) + "\n"
    ours, reference = random.Random(7), random.Random(7)
    short.encode(text, add_special_patches=True, truncate_patches=True, random_truncate=False, rng=ours)
    reference.choice(["head", "tail", "middle"])  # the reference draws whenever a cut is needed
    assert ours.random() == reference.random()


def test_decode_drops_mask_ids():
    assert P.decode([[1, 3, 97, 3, 2] + [0] * 59]) == "a"
    assert P.decode([[3] * 64]) == ""


def test_lowercase_field_lines_are_single_patches():
    assert P.patch_strings("w: la | la |\n") == ["w: la | la |\n"]
    assert P.patch_strings("s: !f! | * |\n") == ["s: !f! | * |\n"]


# -- found by a spec-to-test mutation audit; expected values are the reference M3Patchilizer's output -----


def test_only_newline_splits_lines():
    # The reference splits with re.findall(r".*?\n|.*$"): "\r" and "\x0c" stay inside a line.
    assert P.patch_strings("X:1\nab\rc|d\x0ce|\nf|\n") == ["X:1\n", "ab\rc|", "d\x0ce|\n", "f|\n"]


def test_two_character_field_line_at_the_end_is_a_patch():
    assert P.patch_strings("K:C\nabc|\nK:") == ["K:C\n", "abc|\n", "K:"]
    assert P.patch_strings("w:") == ["w:"]


def test_mtf_needs_ticks_per_beat_as_the_whole_first_word():
    # A first line "ticks_per_beat" alone, or "ticks_per_beatX 3", is ABC (a bar-less music line: no patch).
    assert P.patch_strings("ticks_per_beat\nK:C\nabc|\n") == ["K:C\n", "abc|\n"]
    assert P.patch_strings("ticks_per_beatX 3\nK:C\n") == ["K:C\n"]
    assert P.patch_strings("ticks_per_beat 3\nK:C\n") == ["ticks_per_beat 3\n", "K:C\n"]


def test_mtf_messages_join_only_while_bos_and_eos_fit():
    """Joined length patch + values ≤ PATCH_SIZE - 2 (SPEC §4): at PATCH_SIZE - 1 the eos would be cut."""
    first = "note_on " + "x" * 40 + "\n"  # 49 characters
    text = "ticks_per_beat 480\n" + first + "note_on " + "y" * 13 + "\n"  # values "y"*13 + "\n": 49 + 14 = 63
    assert M3Patchilizer().patch_strings(text) == ["ticks_per_beat 480\n", first, "note_on " + "y" * 13 + "\n"]
    joinable = "ticks_per_beat 480\n" + first + "note_on " + "y" * 12 + "\n"  # 49 + 13 = 62: joined
    assert M3Patchilizer().patch_strings(joinable)[1:] == ["note_on " + "x" * 40 + "\t" + "y" * 12 + "\n"]


def test_mtf_join_drops_only_the_newline_of_the_patch_so_far():
    """The reference joins with patch[:-1]: a CR of a CRLF line stays, as do trailing spaces."""
    text = "ticks_per_beat 480\nnote_on 0 60 64 \r\nnote_on 0 62 64\r\n"
    assert M3Patchilizer().patch_strings(text) == ["ticks_per_beat 480\n", "note_on 0 60 64 \r\t0 62 64\r\n"]


def test_mtf_without_a_final_newline_keeps_it_absent():
    text = "ticks_per_beat 480\nnote_on 0 60 64\nnote_on 0 62 64"
    assert M3Patchilizer().patch_strings(text) == ["ticks_per_beat 480\n", "note_on 0 60 64\t0 62 64"]


def test_truncation_draw_only_when_there_are_more_patches_than_patch_length():
    """The reference draws head/tail/middle only for len(patches) > PATCH_LENGTH: exactly PATCH_LENGTH draws nothing."""
    patchilizer = M3Patchilizer(patch_length=4)
    text = "X:1\nL:1/8\nK:C\nCD|\n"  # 4 patches
    assert len(patchilizer.encode(text)) == 4
    rng = random.Random(7)
    patchilizer.encode(text, truncate_patches=True, random_truncate=True, rng=rng)
    assert rng.getstate() == random.Random(7).getstate()
