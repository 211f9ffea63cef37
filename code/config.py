"""CLaMP 2 / CLaMP 3 / M3 configuration: the one file researchers edit.

Names and defaults are the reference's. Every constant can also be overridden without editing
this file by an environment variable of the same name, e.g.
``PATCH_NUM_LAYERS=2 M3_HIDDEN_SIZE=128 torchrun --nproc_per_node=2 code/train_m3.py``
(bools: 1/0/true/false; lists: comma-separated or a JSON list). The weight and log file names
are derived after the overrides, so they follow them.
"""

from clamp2.configuration import (CLAMP3_VARIANTS, apply_env_overrides, check_choice, check_unknown_overrides,
                                  clamp3_weights_name, derived_log_path)

# Configuration for the data
EVAL_SPLIT = 0.01  # Fraction of training data used for evaluation when no eval set is given

# Configuration for the M3 model
TRAIN_FOLDERS = []  # Folders of .abc/.mtf files for M3 training (or --train_folders)
EVAL_FOLDERS = []  # Folders of .abc/.mtf files for M3 evaluation (or --eval_folders)
PATCH_SIZE = 64  # Size of each patch (characters, including bos/eos)
PATCH_LENGTH = 512  # Maximum number of patches per sequence
PATCH_NUM_LAYERS = 12  # Number of layers in the patch encoder
TOKEN_NUM_LAYERS = 3  # Number of layers in the token decoder
M3_HIDDEN_SIZE = 768  # Hidden size of the M3 model
M3_NUM_EPOCH = 100  # Maximum number of epochs for M3 training
M3_LEARNING_RATE = 1e-4  # Learning rate for the M3 optimizer
M3_WARMUP_STEPS = 0  # Linear LR warm-up steps (0: constant LR from the first step, as the published M3 trained)
M3_BATCH_SIZE = 16  # Batch size per GPU (single card) for M3 training
M3_MASK_RATIO = 0.45  # Ratio of patches corrupted during M3 pre-training
M3_DETERMINISTIC = True  # Seed 42 + rank and deterministic kernels for M3 training
M3_WANDB_LOG = False  # Log M3 training to Weights & Biases (needs wandb and WANDB_API_KEY)
M3_LOAD_CKPT = True  # Resume M3 training from the latest checkpoint if it exists

# Configuration for the CLaMP 2 model
TRAIN_JSONL = ""  # JSONL of training pairs for CLaMP 2 (or --train_jsonl)
EVAL_JSONL = ""  # JSONL of evaluation pairs for CLaMP 2 (or --eval_jsonl)
CLAMP2_HIDDEN_SIZE = 768  # Size of the joint text-music embedding space
TEXT_MODEL_NAME = "FacebookAI/xlm-roberta-base"  # Text encoder: hub id or local directory
CLAMP2_NUM_EPOCH = 100  # Maximum number of epochs for CLaMP 2 training
CLAMP2_LEARNING_RATE = 5e-5  # Learning rate for the CLaMP 2 optimizer
CLAMP2_WARMUP_STEPS = 0  # Linear LR warm-up steps (0: constant LR from the first step, as the published CLaMP 2 trained)
CLAMP2_BATCH_SIZE = 128  # Batch size per GPU (single card) for CLaMP 2 training
LOGIT_SCALE = 1  # Scaling factor of the contrastive logits
MAX_TEXT_LENGTH = 128  # Maximum length of text sequences (tokens)
TEXT_DROPOUT = True  # Build training texts from random metadata/summaries
CLAMP2_PAD_TO_LONGEST = True  # Pad each batch to its longest text/piece (same losses, less compute); 0: fixed maxima
CLAMP2_DETERMINISTIC = True  # Seed 42 + rank and deterministic kernels for CLaMP 2 training
CLAMP2_LOAD_M3 = True  # Start the music encoder from the M3 weights file if it exists
CLAMP2_WANDB_LOG = False  # Log CLaMP 2 training to Weights & Biases (needs wandb and WANDB_API_KEY)
CLAMP2_LOAD_CKPT = True  # Resume CLaMP 2 training from the latest checkpoint if it exists

# Configuration for CLaMP 3 (docs/clamp3.md). It shares TEXT_MODEL_NAME, MAX_TEXT_LENGTH, LOGIT_SCALE,
# TEXT_DROPOUT and the M3 sizes above (its symbolic encoder is M3's patch encoder).
CLAMP3_VARIANT = "saas"  # Published variant the file name is built for: "saas" (best for audio) or "c2" (best for sheet music/MIDI)
M3_TRAIN_FOLDERS = []  # CLaMP 3's name for M3 training folders (used when TRAIN_FOLDERS is empty)
M3_EVAL_FOLDERS = []  # CLaMP 3's name for M3 evaluation folders (used when EVAL_FOLDERS is empty)
CLAMP3_TRAIN_JSONL = ""  # JSONL of training pairs for CLaMP 3 (or --train_jsonl)
CLAMP3_EVAL_JSONL = ""  # JSONL of evaluation pairs for CLaMP 3 (or --eval_jsonl)
CLAMP3_HIDDEN_SIZE = 768  # Size of the joint text-music embedding space of CLaMP 3
AUDIO_HIDDEN_SIZE = 768  # Hidden size of the audio encoder (= the MERT feature width)
AUDIO_NUM_LAYERS = 12  # Number of layers in the audio encoder
MAX_AUDIO_LENGTH = 128  # Maximum number of audio rows per window (5-second MERT segments + 2 zero rows)
CLAMP3_NUM_EPOCH = 100  # Maximum number of epochs for CLaMP 3 training
CLAMP3_LEARNING_RATE = 1e-5  # Learning rate for the CLaMP 3 optimizer
CLAMP3_WARMUP_STEPS = 0  # Linear LR warm-up steps (0: constant LR, as the published CLaMP 3 trained)
CLAMP3_BATCH_SIZE = 256  # Batch size per GPU (single card) for CLaMP 3 training
FREEZE_TEXT = False  # Freeze the text encoder and its projection during CLaMP 3 training
CLAMP3_DETERMINISTIC = True  # Seed 42 + rank and deterministic kernels for CLaMP 3 training
CLAMP3_LOAD_M3 = True  # Start the symbolic encoder from the M3 weights file if it exists
CLAMP3_WANDB_LOG = False  # Log CLaMP 3 training to Weights & Biases (needs wandb and WANDB_API_KEY)
CLAMP3_LOAD_CKPT = True  # Resume CLaMP 3 training from its checkpoint if it exists
SAVE_EVERY = 5  # Save a copy of the CLaMP 3 checkpoint every this many epochs (…_E.pth)

apply_env_overrides(globals())
check_choice("CLAMP3_VARIANT", CLAMP3_VARIANT, CLAMP3_VARIANTS)

# Derived file names (after the overrides, so they follow them); overridable on their own too.
# A warm-up is named only when there is one, so default runs keep the published names.
M3_WEIGHTS_PATH = (
    f"weights_m3_p_size_{PATCH_SIZE}_p_length_{PATCH_LENGTH}_t_layers_{TOKEN_NUM_LAYERS}"
    f"_p_layers_{PATCH_NUM_LAYERS}_h_size_{M3_HIDDEN_SIZE}_lr_{M3_LEARNING_RATE}"
    f"_batch_{M3_BATCH_SIZE}_mask_{M3_MASK_RATIO}{f'_warmup_{M3_WARMUP_STEPS}' if M3_WARMUP_STEPS else ''}.pth"
)
CLAMP2_WEIGHTS_PATH = (
    f"weights_clamp2_h_size_{CLAMP2_HIDDEN_SIZE}_lr_{CLAMP2_LEARNING_RATE}_batch_{CLAMP2_BATCH_SIZE}"
    f"_scale_{LOGIT_SCALE}_t_length_{MAX_TEXT_LENGTH}_t_model_{TEXT_MODEL_NAME.replace('/', '_')}"
    f"_t_dropout_{TEXT_DROPOUT}_m3_{CLAMP2_LOAD_M3}"
    f"{f'_warmup_{CLAMP2_WARMUP_STEPS}' if CLAMP2_WARMUP_STEPS else ''}.pth"
)
# CLaMP 3: the defaults give the published SAAS file name, CLAMP3_VARIANT=c2 the C2 one.
CLAMP3_WEIGHTS_PATH = clamp3_weights_name(globals())
apply_env_overrides(globals(), names=["M3_WEIGHTS_PATH", "CLAMP2_WEIGHTS_PATH", "CLAMP3_WEIGHTS_PATH"])
M3_LOGS_PATH = derived_log_path(M3_WEIGHTS_PATH)
CLAMP2_LOGS_PATH = derived_log_path(CLAMP2_WEIGHTS_PATH)
CLAMP3_LOGS_PATH = derived_log_path(CLAMP3_WEIGHTS_PATH)
apply_env_overrides(globals(), names=["M3_LOGS_PATH", "CLAMP2_LOGS_PATH", "CLAMP3_LOGS_PATH"])
check_unknown_overrides(globals())
