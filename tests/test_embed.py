"""Tests for embed.py: tiny random T5 + on-the-fly sentencepiece tokenizer, checked against
sentencepiece itself, an unpadded float64 run of the encoder and a direct transformers call."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from transformers import T5EncoderModel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import embed  # noqa: E402

D = 32  # tiny width
CAPTIONS = {
    ("pinhole_front", "clip_a"): "The car is stopped at a red traffic light near the bridge.",
    ("pinhole_front", "clip_b"): "Unseen words: zebra XYZZY 1234!",  # out-of-corpus chars -> <unk>
    ("pinhole_side_left", "clip_a"): "Parked cars line the quiet street.",
    ("pinhole_side_left", "clip_b"): "Parked cars line the quiet street.",  # duplicate text, encoded once
}


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return embed.make_tiny_t5(tmp_path_factory.mktemp("t5") / "tiny", d_model=D, seed=0)


@pytest.fixture(scope="module")
def t5(t5_dir):
    return embed.load_t5(t5_dir)


@pytest.fixture(scope="module")
def ref(t5_dir):
    """Independent reference: sentencepiece ids + </s>, float64 encoder run without any padding."""
    sp = spm.SentencePieceProcessor(model_file=str(t5_dir / "spiece.model"))
    enc64 = T5EncoderModel.from_pretrained(str(t5_dir), local_files_only=True).double().eval()

    def run(text, max_length=embed.NUM_TOKENS):
        ids = sp.encode(text)[: max_length - 1] + [1]  # truncation keeps </s> last
        with torch.no_grad():
            return enc64(input_ids=torch.tensor([ids])).last_hidden_state[0].numpy()  # (L, D)
    return sp, run


def test_tokenizer_matches_sentencepiece(t5, ref):
    tokenizer, _ = t5
    sp, _ = ref
    for text in list(CAPTIONS.values()) + list(embed.PREFIX_PROMPTS.values()):
        assert tokenizer(text)["input_ids"] == sp.encode(text) + [1]
    assert sp.pad_id() == 0 and sp.eos_id() == 1 and sp.unk_id() == 2 and sp.bos_id() == -1  # T5's ids


def test_make_tiny_t5_is_deterministic(tmp_path, t5_dir):
    a = embed.make_tiny_t5(tmp_path / "a", d_model=D, seed=0)
    b = embed.make_tiny_t5(tmp_path / "b", d_model=D, seed=1)
    for name in ["tokenizer.json", "spiece.model", "config.json"]:
        assert (a / name).read_bytes() == (t5_dir / name).read_bytes()
    wa, w0, wb = (T5EncoderModel.from_pretrained(str(p), local_files_only=True).state_dict() for p in (a, t5_dir, b))
    assert all(torch.equal(wa[k], w0[k]) for k in w0)
    assert not torch.equal(wa["shared.weight"], wb["shared.weight"])
    assert wa["shared.weight"].shape[1] == D


def test_encode_prompts_matches_unpadded_float64(t5, ref):
    tokenizer, encoder = t5
    sp, run = ref
    prompts = [CAPTIONS["pinhole_front", "clip_a"], "Road.", " ".join(["The car drives on the road."] * 30)]
    emb, lengths = embed.encode_prompts(prompts, tokenizer, encoder, return_lengths=True)
    assert emb.shape == (3, 512, D) and emb.dtype == torch.float32
    for i, text in enumerate(prompts):
        want = run(text)
        n = len(want)
        assert lengths[i] == n == min(len(sp.encode(text)) + 1, 512)
        # real rows do not depend on padding (masked keys), zeros past the length exactly
        np.testing.assert_allclose(emb[i, :n].numpy(), want, rtol=1e-4, atol=1e-4)
        assert torch.all(emb[i, n:] == 0)
        assert emb[i, :n].abs().sum(-1).min() > 0
    # truncation at a short max_length keeps </s> as the last token
    short = embed.encode_prompts(prompts[2:], tokenizer, encoder, max_length=16)
    assert short.shape == (1, 16, D)
    np.testing.assert_allclose(short[0].numpy(), run(prompts[2], max_length=16), rtol=1e-4, atol=1e-4)
    # a single string is a batch of one; bf16 encoder stays close and still returns float32
    one = embed.encode_prompts(prompts[0], tokenizer, encoder)
    assert torch.equal(one[0], emb[0])
    enc_bf16 = T5EncoderModel.from_pretrained(str(encoder.name_or_path), local_files_only=True, dtype=torch.bfloat16)
    lo = embed.encode_prompts(prompts[:1], tokenizer, enc_bf16.eval())
    assert lo.dtype == torch.float32 and torch.all(lo[0, lengths[0]:] == 0)
    assert (lo - emb[:1]).abs().max() < 0.1 * emb[:1].abs().max()
    with pytest.raises(ValueError):
        embed.encode_prompts([], tokenizer, encoder)


def _make_dataset(root):
    for (cam, clip), text in CAPTIONS.items():
        (root / "metas" / cam).mkdir(parents=True, exist_ok=True)
        (root / "metas" / cam / f"{clip}.txt").write_text(text + "\n")
    (root / "videos" / "pinhole_front_right").mkdir(parents=True)
    (root / "videos" / "pinhole_front_right" / "clip_a.mp4").write_bytes(b"")  # gets the --prompt caption


def test_embed_cli_end_to_end(tmp_path, t5_dir, t5, ref):
    tokenizer, encoder = t5
    sp, run = ref
    ds = tmp_path / "waymo"
    _make_dataset(ds)
    prompt = "A video of car driving on the road."
    cmd = [sys.executable, str(REPO / "embed.py"), "--dataset", str(ds), "--t5", str(t5_dir), "--batch", "2",
           "--prompt", prompt, "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (ds / "metas/pinhole_front_right/clip_a.txt").read_text().strip() == prompt

    expected = {ds / "t5_xxl" / cam / f"{clip}.pickle": text for (cam, clip), text in CAPTIONS.items()}
    expected[ds / "t5_xxl/pinhole_front_right/clip_a.pickle"] = prompt
    for cam, text in embed.PREFIX_PROMPTS.items():
        expected[ds / "cache" / f"prefix_t5_embeddings_{cam}.pickle"] = text
    written = sorted(p for p in ds.rglob("*.pickle"))
    assert written == sorted(expected)
    assert not [p for p in ds.rglob("*") if p.name.endswith(".tmp")]

    # direct transformers call, the official recipe: pad to 512, mask, zero, trim to the mask length
    texts = list(expected.values())
    tok = tokenizer(texts, padding="max_length", truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        direct = encoder(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
    lengths = tok["attention_mask"].sum(1)
    assert direct[0, lengths[0]:].abs().max() > 0  # padded rows really need zeroing
    for i, (path, text) in enumerate(expected.items()):
        with open(path, "rb") as f:
            obj = pickle.load(f)
        assert isinstance(obj, list) and len(obj) == 1
        arr = obj[0]
        n = int(lengths[i])
        assert arr.dtype == np.float16 and arr.shape == (n, D) and n == len(sp.encode(text)) + 1
        np.testing.assert_allclose(arr.astype(np.float32), direct[i, :n].numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(arr.astype(np.float64), run(text), rtol=2e-3, atol=2e-3)
        np.testing.assert_array_equal(embed.load_embedding(path), arr.astype(np.float32))

    # re-run: everything skipped, files untouched; a deleted file is rebuilt identically
    victim = ds / "t5_xxl/pinhole_front/clip_b.pickle"
    before = {p: p.read_bytes() for p in written}
    mtimes = {p: p.stat().st_mtime_ns for p in written}
    victim.unlink()
    stats = embed.embed_dataset(ds, tokenizer, encoder, batch=3)
    assert stats["written"] == 1 and stats["skipped"] == len(written) - 1
    assert all(p.read_bytes() == before[p] for p in written)
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in written if p != victim)
    # a caption rewritten after its embedding (e.g. prepare.py re-run with --captions) is embedded again
    meta = ds / "metas/pinhole_front/clip_b.txt"
    meta.write_text("A new caption.\n")
    os.utime(meta, ns=(victim.stat().st_mtime_ns + 10 ** 9,) * 2)
    assert embed.embed_dataset(ds, tokenizer, encoder, batch=3)["written"] == 1
    assert victim.read_bytes() != before[victim]

    # bad input on the command line: one line naming the problem, no traceback
    r = subprocess.run(cmd[:4] + ["--t5", str(tmp_path / "nowhere")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1 and "embed.py: error: T5 directory" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(cmd[:4] + ["--make_tiny_t5", "16"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "needs an explicit --t5" in r.stderr


def test_embed_dataset_bad_captions(tmp_path, t5):
    tokenizer, encoder = t5
    with pytest.raises(FileNotFoundError, match="metas"):
        embed.embed_dataset(tmp_path, tokenizer, encoder)
    bad = tmp_path / "metas/pinhole_front/empty.txt"
    bad.parent.mkdir(parents=True)
    bad.write_text("  \n")
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        embed.embed_dataset(tmp_path, tokenizer, encoder)
    bad.write_bytes(b"\xff\xfe caption")
    with pytest.raises(ValueError, match="empty.txt.*UTF-8"):
        embed.embed_dataset(tmp_path, tokenizer, encoder)
    assert not (tmp_path / "t5_xxl").exists()  # bad input is caught before anything is written


def test_load_embedding_formats(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 16)).astype(np.float32)

    def dump(name, obj):
        p = tmp_path / name
        p.write_bytes(pickle.dumps(obj))
        return p

    good = {
        "official.pickle": [x.astype(np.float16)],  # ours / official: [(L, D) fp16]
        "toolkit.pkl": [x],  # create_t5_embed.py: [(L, D) fp32]
        "toolkit_mv.pkl": [x[None]],  # create_t5_embed_mv.py: [(1, L, D)]
        "bare.pkl": x[None],  # toolkit prefix cache: bare array
        "tensor.pickle": [torch.from_numpy(x)],
    }
    for name, obj in good.items():
        got = embed.load_embedding(dump(name, obj))
        assert got.dtype == np.float32 and got.shape == (7, 16)
        tol = 1e-3 if "official" in name else 0
        np.testing.assert_allclose(got, x, rtol=tol, atol=tol)

    bad = {
        "flat.pkl": [x[0]],
        "batch2.pkl": [np.stack([x, x])],
        "four_d.pkl": [x[None, None]],
        "empty.pkl": [x[:0]],
        "two.pkl": [x, x],
        "ints.pkl": [np.ones((3, 4), dtype=np.int64)],
        "text.pkl": "hello",
        "inf.pkl": [np.full((2, 3), np.inf, dtype=np.float32)],
    }
    for name, obj in bad.items():
        with pytest.raises(ValueError, match=name):
            embed.load_embedding(dump(name, obj))
    (tmp_path / "broken.pickle").write_bytes(pickle.dumps([x])[:50])  # half-written
    with pytest.raises(ValueError, match="broken.pickle"):
        embed.load_embedding(tmp_path / "broken.pickle")
    with pytest.raises(ValueError, match="clip.npy"):
        embed.load_embedding(tmp_path / "clip.npy")

    # find_embedding: .pickle first, then .pkl, else a message naming both
    assert embed.find_embedding(tmp_path, "toolkit") == tmp_path / "toolkit.pkl"
    dump("toolkit.pickle", [x])
    assert embed.find_embedding(tmp_path, "toolkit") == tmp_path / "toolkit.pickle"
    with pytest.raises(FileNotFoundError, match=r"nothere\.pickle or \.pkl"):
        embed.find_embedding(tmp_path, "nothere")


def test_save_embedding_rejects_fp16_overflow(tmp_path):
    with pytest.raises(ValueError, match="float16"):
        embed.save_embedding(tmp_path / "big.pickle", np.full((2, 4), 1e6, dtype=np.float32))
    assert not list(tmp_path.iterdir())


def test_load_t5_errors(tmp_path, t5_dir):
    with pytest.raises(FileNotFoundError, match="does not exist.*config.json.*tokenizer.json"):
        embed.load_t5(tmp_path / "nope")
    part = tmp_path / "partial"
    part.mkdir()
    (part / "config.json").write_bytes((t5_dir / "config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="missing: model.safetensors or .*, tokenizer.json or spiece.model"):
        embed.load_t5(part)
    # sharded weights: a missing shard is named
    (part / "tokenizer.json").write_bytes((t5_dir / "tokenizer.json").read_bytes())
    (part / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-00001-of-00002.safetensors"}}')
    with pytest.raises(FileNotFoundError, match="missing: model-00001-of-00002.safetensors"):
        embed.load_t5(part)
    # not a T5
    other = tmp_path / "other"
    other.mkdir()
    for f in ["tokenizer.json", "model.safetensors"]:
        (other / f).write_bytes((t5_dir / f).read_bytes())
    (other / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="model_type 'bert'"):
        embed.load_t5(other)
    (other / "config.json").write_text('{"model_type": "t')  # a truncated download
    with pytest.raises(ValueError, match="other/config.json is not a valid model config"):
        embed.load_t5(other)
    # truncated weights: a clear error naming the directory
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ["tokenizer.json", "config.json", "tokenizer_config.json"]:
        (broken / f).write_bytes((t5_dir / f).read_bytes())
    (broken / "model.safetensors").write_bytes((t5_dir / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ValueError, match="encoder weights from .*broken"):
        embed.load_t5(broken)
