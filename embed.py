"""
T5-XXL caption embeddings for multiview post-training.

The DiT cross-attends to the last hidden state of the google-t5/t5-11b *encoder* (the T5-XXL text
encoder, width 1024). Captions are encoded once, ahead of training, exactly the way the official
text encoder does it: pad to 512 tokens, run the encoder with the attention mask, zero every row
past the prompt's real length (real tokens + </s>). On disk an embedding is trimmed to that length.

    python embed.py --dataset datasets/waymo --t5 checkpoints/google-t5/t5-11b [--batch 16] [--dtype bf16]

reads   <dataset>/metas/<camera>/<clip>.txt                 (one caption per file)
writes  <dataset>/t5_xxl/<camera>/<clip>.pickle            pickle([float16 array (L, 1024)])
        <dataset>/cache/prefix_t5_embeddings_<camera>.pickle   same format, for PREFIX_PROMPTS[camera]

which is the folder layout of the official Waymo post-training docs. The training loader reads the
files back with load_embedding(), which also takes the toolkit formats (.pkl, (1, L, D) arrays).
sample.py shares encode_prompts(). make_tiny_t5() builds a small random T5 + tokenizer for tests
and the CPU demo.
"""

import argparse
import io
import json
import os
import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from prepare import VIEW_PREFIX

# -----------------------------------------------------------------------------
# constants of the official text pipeline

NUM_TOKENS = 512  # every prompt is padded/truncated to this; the DiT splits its context in 512-token blocks

# One sentence per Waymo camera saying where the camera points. These are the prefix sentences of
# the official Waymo T5 scripts (the CSV front captions start with the front one). The predict2
# loader never reads the prefix caches (the learned view embedding tells views apart); we still
# write them so the folder matches the official layout and predict1-style loaders work.
PREFIX_PROMPTS = VIEW_PREFIX  # one sentence per camera, shared with prepare.py's captions

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # no fp16: T5 1.0 activations overflow it
WEIGHT_FILES = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"]
TOKENIZER_FILES = ["tokenizer.json", "spiece.model"]

# -----------------------------------------------------------------------------
# loading T5 from a local directory


def _check_t5_dir(path):
    """Raise a FileNotFoundError that lists what a T5 directory must hold, if anything is missing."""
    path = Path(path)
    expected = (f"expected a local T5 directory (e.g. a download of google-t5/t5-11b) holding config.json, "
                f"weights ({' or '.join(WEIGHT_FILES)}) and a tokenizer ({' or '.join(TOKENIZER_FILES)})")
    if not path.is_dir():
        raise FileNotFoundError(f"T5 directory {path} does not exist; {expected}")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    weights = [f for f in WEIGHT_FILES if (path / f).is_file()]
    if not weights:
        missing.append(" or ".join(WEIGHT_FILES))
    for index in [f for f in weights if f.endswith(".index.json")]:  # sharded: every shard must be there
        try:
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ValueError(f"{path / index} is not a valid weight index: {e}") from e
        missing += [s for s in shards if not (path / s).is_file()]
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    if missing:
        raise FileNotFoundError(f"T5 directory {path} is incomplete, missing: {', '.join(missing)}; {expected}")
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (ValueError, AttributeError) as e:  # truncated download, or not an object
        raise ValueError(f"{path / 'config.json'} is not a valid model config: {e}") from e
    if model_type != "t5":
        raise ValueError(f"{path / 'config.json'} has model_type {model_type!r}, expected 't5'")


def load_t5(path, device="cpu", dtype=torch.float32):
    """Load (tokenizer, encoder) from a local T5 directory; never touches the hub."""
    from transformers import T5EncoderModel, T5TokenizerFast  # late import: transformers is slow to import

    _check_t5_dir(path)
    try:
        tokenizer = T5TokenizerFast.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # e.g. only spiece.model present and no protobuf to convert it
        raise ValueError(f"could not load the T5 tokenizer from {path} (tokenizer.json is the safe file to "
                         f"have; converting spiece.model needs the protobuf package): {e}") from e
    try:
        encoder = T5EncoderModel.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    except Exception as e:  # truncated download, wrong architecture, ...
        raise ValueError(f"could not load the T5 encoder weights from {path}: {e}") from e
    encoder = encoder.to(device).eval().requires_grad_(False)
    return tokenizer, encoder


# -----------------------------------------------------------------------------
# prompts -> embeddings (shared with sample.py)


@torch.no_grad()  # not inference_mode: the result may feed a model that is being trained
def encode_prompts(prompts, tokenizer, encoder, max_length=NUM_TOKENS, return_lengths=False):
    """Encode prompts to float32 [B, max_length, D] on the encoder's device, zero past each real length."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) == 0:
        raise ValueError("encode_prompts got an empty list of prompts")
    device = next(encoder.parameters()).device
    # T5 appends </s> (kept when truncating), pads with id 0 on the right, no BOS
    tokens = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length,
                       padding_side="right", return_tensors="pt")
    ids_BL = tokens["input_ids"].to(device)
    mask_BL = tokens["attention_mask"].to(device)
    emb_BLD = encoder(input_ids=ids_BL, attention_mask=mask_BL).last_hidden_state.float()
    # padded rows carry garbage (they attend to the real tokens); the official encoder zeroes them
    emb_BLD = emb_BLD.masked_fill(~mask_BL.bool()[:, :, None], 0.0)
    if return_lengths:
        return emb_BLD, mask_BL.sum(1).cpu()  # (B,) real tokens incl. </s>
    return emb_BLD


# -----------------------------------------------------------------------------
# embedding files: write (atomic) and read (every format seen in the wild)


def _atomic_write(path, data):
    """Write bytes to path via a temp file in the same folder + os.replace: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # hidden, per process; normal file permissions
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_embedding(path, emb_LD):
    """Save one (L, D) embedding the official way: pickle of a one-element list, float16."""
    emb_LD = np.asarray(emb_LD, dtype=np.float32)
    if not np.isfinite(emb_LD).all() or np.abs(emb_LD).max() > np.finfo(np.float16).max:
        raise ValueError(f"embedding for {path} does not fit float16 (max |x| = {np.abs(emb_LD).max():.3g})")
    _atomic_write(path, pickle.dumps([emb_LD.astype(np.float16)], protocol=4))


def load_embedding(path):
    """Read a T5 embedding file (.pickle/.pkl; (L, D) or (1, L, D), bare or in a 1-list) as float32 (L, D)."""
    path = Path(path)
    if path.suffix not in (".pickle", ".pkl"):
        raise ValueError(f"{path}: expected a .pickle or .pkl T5 embedding file")
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e
    if isinstance(obj, (list, tuple)):  # official and toolkit files: [array]
        if len(obj) != 1:
            raise ValueError(f"{path}: expected a list holding one embedding array, got a {type(obj).__name__} of {len(obj)}")
        obj = obj[0]
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().float().numpy()
    if not isinstance(obj, np.ndarray) or not np.issubdtype(obj.dtype, np.floating):
        raise ValueError(f"{path}: expected a float array, got {type(obj).__name__} {getattr(obj, 'dtype', '')}")
    if obj.ndim == 3 and obj.shape[0] == 1:  # create_t5_embed_mv.py keeps the batch dim
        obj = obj[0]
    if obj.ndim != 2 or obj.shape[0] == 0:
        raise ValueError(f"{path}: embedding has shape {tuple(obj.shape)}, expected (L, D) or (1, L, D) with L >= 1")
    obj = obj.astype(np.float32)
    if not np.isfinite(obj).all():
        raise ValueError(f"{path}: embedding contains inf/nan")
    return obj


def find_embedding(folder, stem):
    """Path of <folder>/<stem>.pickle (ours/official) or .pkl (toolkit/loader naming); error if neither."""
    for ext in (".pickle", ".pkl"):
        p = Path(folder) / f"{stem}{ext}"
        if p.is_file():
            return p
    raise FileNotFoundError(f"no T5 embedding {Path(folder) / stem}.pickle or .pkl (run embed.py)")


# -----------------------------------------------------------------------------
# walking the data set


def _read_caption(path):
    """Caption text of one metas file; clear errors for unreadable or empty files."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: caption is not valid UTF-8 ({e})") from e
    if not text:
        raise ValueError(f"{path}: caption file is empty")
    return text


def write_missing_metas(dataset, prompt):
    """Give every videos/<camera>/<clip>.mp4 without a caption the fixed prompt (the official docs' mode)."""
    n = 0
    for video in sorted(Path(dataset).glob("videos/*/*.mp4")):
        meta = Path(dataset) / "metas" / video.parent.name / f"{video.stem}.txt"
        if not meta.exists():
            _atomic_write(meta, (prompt.strip() + "\n").encode("utf-8"))
            n += 1
    return n


def embed_dataset(dataset, tokenizer, encoder, batch=16, overwrite=False, max_length=NUM_TOKENS):
    """Embed every metas/<camera>/<clip>.txt and the per-camera prefixes; skip finished files."""
    dataset = Path(dataset)
    metas = sorted(dataset.glob("metas/*/*.txt"))
    if not metas:
        raise FileNotFoundError(f"no captions found: expected {dataset}/metas/<camera>/<clip>.txt "
                                f"(write them with prepare.py, or pass --prompt to use one fixed caption)")
    cameras = sorted({m.parent.name for m in metas})
    # jobs: output path -> text. The prefix caches come first so a short run still leaves them.
    jobs = {dataset / "cache" / f"prefix_t5_embeddings_{cam}.pickle": text for cam, text in PREFIX_PROMPTS.items()}
    jobs.update({dataset / "t5_xxl" / m.parent.name / f"{m.stem}.pickle": m for m in metas})
    todo = {out: src for out, src in jobs.items() if overwrite or not out.exists()
            or (isinstance(src, Path) and src.stat().st_mtime > out.stat().st_mtime)}  # caption rewritten since
    texts = {out: (src if isinstance(src, str) else _read_caption(src)) for out, src in todo.items()}
    unknown = [c for c in cameras if c not in PREFIX_PROMPTS]
    if unknown:
        print(f"note: no prefix sentence for camera folder(s) {unknown}; only their captions are embedded")

    # encode each distinct text once (with --prompt every clip shares one caption)
    by_text = {}
    for out, text in texts.items():
        by_text.setdefault(text, []).append(out)
    unique = list(by_text)
    n_truncated = 0
    bar = tqdm(total=len(todo), desc="t5 embeddings", unit="file", disable=not todo)
    for i in range(0, len(unique), batch):
        chunk = unique[i:i + batch]
        emb_BLD, len_B = encode_prompts(chunk, tokenizer, encoder, max_length=max_length, return_lengths=True)
        emb_BLD = emb_BLD.cpu().numpy()
        for text, emb_LD, n in zip(chunk, emb_BLD, len_B.tolist()):
            n_truncated += n == max_length and len(tokenizer(text, truncation=True,
                                                             max_length=max_length + 1).input_ids) > max_length
            for out in by_text[text]:
                save_embedding(out, emb_LD[:n])  # trim to real tokens + </s>, like the official files
                bar.update(1)
    bar.close()
    if n_truncated:
        print(f"warning: {n_truncated} caption(s) reached {max_length} tokens and were truncated")
    return {"written": len(todo), "skipped": len(jobs) - len(todo), "cameras": cameras}


# -----------------------------------------------------------------------------
# a tiny random T5 (tests and the CPU demo)

_TINY_CORPUS = [
    *PREFIX_PROMPTS.values(),
    "The video depicts a street scene with a car driving towards the camera.",
    "The car is stopped at a traffic light, which is red, and then continues driving forward.",
    "A pedestrian crosses the road at the crosswalk while cyclists wait on the right.",
    "Trucks and buses move slowly in the left lane of a wide highway.",
    "The road is wet after the rain and the sky is grey and cloudy.",
    "Parked cars line both sides of a quiet residential street with trees.",
    "A speed limit sign of 25 mph is visible next to the intersection.",
    "The ego vehicle turns left at a green light in a busy downtown area.",
    "It is night; headlights and street lamps light the empty parking lot.",
    "Construction cones narrow the lane near a bridge on a sunny afternoon.",
    "A video of car driving on the road.",
]


def make_tiny_t5(out_dir, d_model=64, seed=0, num_layers=2, vocab_size=256):
    """Build a small random T5 encoder + a sentencepiece tokenizer trained here; save as a T5 directory."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    # 1. tokenizer: a unigram sentencepiece model with T5's special ids (pad 0, </s> 1, unk 2, no BOS).
    # Identity normalization, so the tokenizers-backend rebuild below needs no precompiled charsmap.
    spm.set_random_generator_seed(seed)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_TINY_CORPUS * 4), model_writer=proto, model_type="unigram",
        vocab_size=vocab_size, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        normalization_rule_name="identity", character_coverage=1.0, num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    # transformers 5 cannot read spiece.model without protobuf, so hand it the (piece, score) list
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0)

    # 2. encoder: T5 1.0 layout (relu FFN, relative position buckets), random weights from `seed`
    heads = next(h for h in (4, 2, 1) if d_model % h == 0)
    config = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=d_model // heads, num_heads=heads,
                      d_ff=2 * d_model, num_layers=num_layers, feed_forward_proj="relu",
                      is_encoder_decoder=False, use_cache=False)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
        torch.manual_seed(seed)
        encoder = T5EncoderModel(config).eval()

    # 3. save into a temp dir, then move file by file (each move is atomic)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        encoder.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "spiece.model").write_bytes(proto.getvalue())  # the source, as in real T5 dirs
        for f in sorted(Path(tmp).iterdir(), key=lambda f: f.name == "config.json"):  # the "built" mark last
            os.replace(f, out_dir / f.name)
    return out_dir


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    p = argparse.ArgumentParser(description="Encode metas/<camera>/<clip>.txt captions with T5-XXL.")
    p.add_argument("--dataset", "--dataset_path", default="datasets/waymo", help="data set root (holds metas/)")
    p.add_argument("--t5", default=None, help="local google-t5/t5-11b directory (default checkpoints/google-t5/t5-11b)")
    p.add_argument("--batch", type=int, default=16, help="captions per encoder call")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="encoder dtype (official: fp32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: GPU if present")
    p.add_argument("--prompt", default=None, help="write this caption for every video that has no metas file yet")
    p.add_argument("--overwrite", action="store_true", help="re-embed files that already exist")
    p.add_argument("--make_tiny_t5", type=int, default=None, metavar="D_MODEL",
                   help="demo/tests: first build a tiny random T5 of this width at --t5 if it has no config.json")
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error("--batch must be >= 1")
    if args.make_tiny_t5 is not None and args.t5 is None:
        p.error("--make_tiny_t5 needs an explicit --t5 folder (never the real T5's default path)")
    args.t5 = args.t5 or "checkpoints/google-t5/t5-11b"

    if args.prompt is not None:
        print(f"wrote {write_missing_metas(args.dataset, args.prompt)} missing metas files with --prompt")
    if args.make_tiny_t5 is not None and not (Path(args.t5) / "config.json").exists():
        make_tiny_t5(args.t5, d_model=args.make_tiny_t5)
        print(f"built a tiny random T5 (d_model {args.make_tiny_t5}) at {args.t5}")
    tokenizer, encoder = load_t5(args.t5, device=args.device, dtype=DTYPES[args.dtype])
    print(f"T5 encoder from {args.t5}: d_model {encoder.config.d_model}, {args.dtype} on {args.device}")
    stats = embed_dataset(args.dataset, tokenizer, encoder, batch=args.batch, overwrite=args.overwrite)
    print(f"cameras {stats['cameras']}: wrote {stats['written']} embeddings, skipped {stats['skipped']} existing")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # bad input: the message names the file and the problem
        print(f"embed.py: error: {e}", file=sys.stderr)
        sys.exit(1)
