"""Tests for prepare.py: TFRecord framing, Frame decoding, conversion, captions, bad input, crash/resume, synthetic data.

The segments are written by tests/_tfrecord_writer.py, an independent implementation of the format (bitwise
CRC32C, hand-built protobuf), with JPEGs at the real Waymo sizes scaled down by 20 (96x64 and 96x44).

    /work/venv/bin/python -m pytest tests/test_prepare.py -q
"""

import json
import math
import os
import struct
import subprocess
import sys

import google_crc32c
import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import _tfrecord_writer as tfw  # noqa: E402
import prepare  # noqa: E402

MEAN_TOL = 3.0  # mean |video - source| per frame (0..255) at crf 18; measured ~1.5 on these images
P99_TOL = 12  # 99th percentile of |video - source|; chroma subsampling smears the disc edge a little


# ----------------------------------------------------------------------------------------------
# helpers

def read_video(path):
    """(frames uint8 (T, H, W, 3), ffmpeg metadata) read back with imageio."""
    reader = imageio.get_reader(path, "ffmpeg")
    try:
        return np.stack(list(reader.iter_data())), reader.get_meta_data()
    finally:
        reader.close()


def record_offsets(path):
    """Byte offset of every record in a TFRecord file (parsed here with struct, not with prepare)."""
    data, offsets, pos = open(path, "rb").read(), [], 0
    while pos < len(data):
        offsets.append(pos)
        pos += 16 + struct.unpack("<Q", data[pos:pos + 8])[0]
    return offsets


def check_clip(out, clip, sources, size=None):
    """Every camera video of a clip matches its source frames: count, size, fps, codec, pixels, frame order."""
    for enum, folder in tfw.ENUM_TO_FOLDER.items():
        frames, meta = read_video(os.path.join(out, "videos", folder, clip + ".mp4"))
        src = np.stack(sources[enum]).astype(np.int16)
        assert frames.shape == src.shape, (folder, frames.shape, src.shape)
        assert meta["fps"] == 10.0 and meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
        assert meta["size"] == (src.shape[2], src.shape[1])
        err = np.abs(frames.astype(np.int16) - src)
        for i in range(len(src)):
            assert err[i].mean() < MEAN_TOL, (folder, i, err[i].mean())
            assert np.percentile(err[i], 99) <= P99_TOL, (folder, i, np.percentile(err[i], 99))
            if i > 0:  # frame i is closer to source i than to source i-1: no shift or reordering
                assert err[i].mean() < np.abs(frames[i].astype(np.int16) - src[i - 1]).mean()
        assert os.path.isfile(os.path.join(out, "metas", folder, clip + ".txt"))


def dataset_files(out):
    """All files under a dataset root, relative paths."""
    return sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)


# ----------------------------------------------------------------------------------------------
# framing and wire format

def test_crc32c_matches_bitwise_reference_and_documented_vectors():
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 8, 100, 1000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert google_crc32c.value(data) == tfw.crc32c_bitwise(data)
        assert prepare.masked_crc32c(data) == tfw.mask(tfw.crc32c_bitwise(data))
    assert tfw.crc32c_bitwise(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert prepare.masked_crc32c(b"123456789") == 0xC78AB0E5
    assert prepare.masked_crc32c(b"") == 0xA282EAD8
    # The first 12 bytes of a real one-frame Waymo file (data.md 1.1): length 2,168,758 and its masked CRC.
    header = bytes.fromhex("b617210000000000" "58bd39b1")
    assert struct.unpack("<Q", header[:8])[0] == 2_168_758
    assert prepare.masked_crc32c(header[:8]) == struct.unpack("<I", header[8:])[0]


def test_read_records_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    payloads = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (0, 1, 300, 5000, 17)]
    path = tmp_path / "x.tfrecord"
    path.write_bytes(b"".join(tfw.frame_record(p) for p in payloads))
    assert [(i, p) for i, p in prepare.read_records(str(path))] == list(enumerate(payloads))


def test_parse_frame_keys_images_by_camera_name_not_position():
    jpegs = {cam: tfw.jpeg_bytes(tfw.test_image(cam, 0, 16, 8)) for cam in tfw.ENUM_TO_FOLDER}
    for order in (tfw.REAL_ORDER, [5, 4, 3, 2, 1]):
        payload = tfw.encode_frame("seg_123", 1_557_855_899_937_589, [(c, jpegs[c]) for c in order],
                                   tfw.SMALL_SIZE)
        name, timestamp, images = prepare.parse_frame(payload)
        assert name == "seg_123" and timestamp == 1_557_855_899_937_589
        assert {cam: bytes(v) for cam, v in images.items()} == {tfw.ENUM_TO_FOLDER[c]: jpegs[c] for c in jpegs}
    # negative int64 timestamps are ten-byte varints (two's complement)
    assert prepare.parse_frame(tfw.encode_frame("s", -5, [], {}))[1] == -5
    with pytest.raises(ValueError, match="camera enum 7"):
        prepare.parse_frame(tfw.encode_frame("s", 1, [(7, jpegs[1])], {}))
    with pytest.raises(ValueError, match="twice"):
        prepare.parse_frame(tfw.encode_frame("s", 1, [(1, jpegs[1]), (1, jpegs[1])], {}))
    with pytest.raises(ValueError, match="past the end"):
        prepare.parse_frame(tfw.encode_frame("s", 1, [(1, jpegs[1])], {})[:-40])


# ----------------------------------------------------------------------------------------------
# conversion

def test_convert_two_segments_in_parallel_with_json_captions(tmp_path):
    src_dir, out = tmp_path / "waymo", tmp_path / "out"
    src_dir.mkdir()
    clips = ["10017090168044687777_6380_000_6400_000", "1005081002024129653_5313_150_5333_150"]
    sources = {clip: tfw.write_segment(str(src_dir / f"segment-{clip}_with_camera_labels.tfrecord"), clip, 10)
               for clip in clips}
    captions = {f"{clips[0]}_{cam}": f"caption of {cam} ." for cam in prepare.CAMERAS}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    run = subprocess.run([sys.executable, "prepare.py", "--waymo", str(src_dir), "--out", str(out), "-n", "2",
                          "--captions", str(tmp_path / "captions.json")], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    for clip in clips:
        check_clip(str(out), clip, sources[clip])
    for cam in prepare.CAMERAS:
        assert (out / "metas" / cam / f"{clips[0]}.txt").read_text() == f"caption of {cam} .\n"
        assert (out / "metas" / cam / f"{clips[1]}.txt").read_text() == prepare.DEFAULT_PROMPT + "\n"
    assert f"clip {clips[1]} has no caption" in run.stderr  # warned, and given the default prompt
    assert f"clip {clips[0]} has no caption" not in run.stderr
    assert len(dataset_files(str(out))) == 2 * 10 and not (out / ".staging").exists()


def test_resize_option(tmp_path):
    sources = tfw.write_segment(str(tmp_path / "a.tfrecord"), "seg_a", 4)
    out = str(tmp_path / "out")
    assert prepare.main(["--waymo", str(tmp_path / "a.tfrecord"), "--out", out, "--height", "32",
                         "--width", "48", "--prompt", "a road"]) == 0
    resized = {cam: [np.asarray(Image.fromarray(f).resize((48, 32), Image.BILINEAR)) for f in frames]
               for cam, frames in sources.items()}
    check_clip(out, "seg_a", resized)
    assert open(os.path.join(out, "metas", "pinhole_side_left", "seg_a.txt")).read() == "a road\n"


def test_caption_files(tmp_path):
    front = prepare.VIEW_PREFIX["pinhole_front"] + " The video depicts a parking lot."
    csv_path = tmp_path / "waymo_caption.csv"
    csv_path.write_text(f'clip_a,clip_b\n"{front}","A road, at night."\n')
    table = prepare.load_captions(str(csv_path))
    assert table["clip_a"]["pinhole_front"] == front
    assert table["clip_a"]["pinhole_side_left"] == "The video is captured from a camera mounted on a car. " \
        "The camera is facing to the left. The video depicts a parking lot."
    assert table["clip_b"]["pinhole_front"] == "A road, at night."
    assert table["clip_b"]["pinhole_front_right"] == prepare.VIEW_PREFIX["pinhole_front_right"] + " A road, at night."

    json_path = tmp_path / "texts.json"
    json_path.write_text(json.dumps({"c1_pinhole_front": "f", "c1_pinhole_side_left": "sl", "c2": "all"}))
    table = prepare.load_captions(str(json_path))
    captions, warnings = prepare.clip_captions("c1", table, None, "texts.json")
    assert captions["pinhole_front"] == "f" and captions["pinhole_side_left"] == "sl"
    assert captions["pinhole_side_right"] == prepare.DEFAULT_PROMPT
    assert len(warnings) == 1 and "pinhole_front_left" in warnings[0] and "pinhole_side_right" in warnings[0]
    assert prepare.clip_captions("c2", table, None, "texts.json") == ({c: "all" for c in prepare.CAMERAS}, [])
    captions, warnings = prepare.clip_captions("c3", table, None, "texts.json")
    assert set(captions.values()) == {prepare.DEFAULT_PROMPT} and "c3 has no caption in texts.json" in warnings[0]
    json_path.write_text(json.dumps({"c4_pinhole_front": " ", "c4_pinhole_side_left": "sl"}))  # empty = none
    captions, warnings = prepare.clip_captions("c4", prepare.load_captions(str(json_path)), None, "texts.json")
    assert captions["pinhole_front"] == prepare.DEFAULT_PROMPT and "pinhole_front," in warnings[0]
    csv_path.write_text('clip_a,clip_b\n"",x\n')
    assert set(prepare.load_captions(str(csv_path))) == {"clip_b"}

    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n3,4\n")
    with pytest.raises(SystemExit, match="bad.csv"):
        prepare.load_captions(str(bad))


# ----------------------------------------------------------------------------------------------
# bad input: the bad segment fails with file, record and problem; the good one converts; nothing partial

def _truncate(path):
    offsets = record_offsets(path)
    with open(path, "r+b") as f:
        f.truncate(offsets[3] + 12 + 10)


def _flip(path, where):
    offsets = record_offsets(path)
    data = bytearray(open(path, "rb").read())
    data[offsets[2] + where] ^= 0x40
    open(path, "wb").write(bytes(data))


def _drop_camera(i, images):
    return [(c, j) for c, j in images if not (i == 2 and c == tfw.SIDE_RIGHT)]


def _break_jpeg(i, images):
    return [(c, j[:len(j) // 3] if (i == 1 and c == tfw.FRONT_LEFT) else j) for c, j in images]


def _resize_front(i, images):
    small = tfw.jpeg_bytes(tfw.test_image(tfw.FRONT, i, 80, 64))
    return [(c, small if (i == 3 and c == tfw.FRONT) else j) for c, j in images]


BAD_CASES = {  # name: (frame_hook, file edit, expected message)
    "truncated": (None, _truncate, "record 3: truncated record"),
    "payload_crc": (None, lambda p: _flip(p, 12 + 40), "record 2: CRC mismatch in the record payload"),
    "header_crc": (None, lambda p: _flip(p, 9), "record 2: CRC mismatch in the record header"),
    "missing_camera": (_drop_camera, None, "record 2: frame is missing camera(s) pinhole_side_right"),
    "bad_jpeg": (_break_jpeg, None, "record 1: pinhole_front_left image is not a decodable JPEG"),
    "size_change": (_resize_front, None, "record 3: pinhole_front image size changed from 96x64 to 80x64"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_segment_fails_alone(tmp_path, capsys, case):
    hook, edit, message = BAD_CASES[case]
    src_dir, out = tmp_path / "in", str(tmp_path / "out")
    src_dir.mkdir()
    good = tfw.write_segment(str(src_dir / "a_good.tfrecord"), "good_clip", 3)
    bad_path = str(src_dir / "b_bad.tfrecord")
    tfw.write_segment(bad_path, "bad_clip", 5, frame_hook=hook)
    if edit:
        edit(bad_path)
    assert prepare.main(["--waymo", str(src_dir), "--out", out]) == 1
    err = capsys.readouterr().err
    assert f"{bad_path}: {message}" in err, err
    assert "1 converted, 0 already done, 1 failed" in err
    check_clip(out, "good_clip", good)
    assert dataset_files(out) == sorted(os.path.join(d, c, "good_clip" + ext) for d, ext in
                                        (("metas", ".txt"), ("videos", ".mp4")) for c in prepare.CAMERAS)


def test_empty_and_missing_inputs(tmp_path, capsys):
    (tmp_path / "empty.tfrecord").write_bytes(b"")
    assert prepare.main(["--waymo", str(tmp_path / "empty.tfrecord"), "--out", str(tmp_path / "o")]) == 1
    assert "empty.tfrecord: no records" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="does not exist"):
        prepare.main(["--waymo", str(tmp_path / "nope.tfrecord"), "--out", str(tmp_path / "o")])


# ----------------------------------------------------------------------------------------------
# crash in the middle of a run, then re-run: complete and correct, finished clips untouched

CRASH_SCRIPT = """
import os, sys
import prepare
count = [0]
open_video = prepare.open_video
def crashing_open_video(*args, **kwargs):
    writer = open_video(*args, **kwargs)
    append = writer.append_data
    def append_data(frame):
        count[0] += 1
        if count[0] == int(sys.argv[1]):
            os._exit(3)  # like a kill -9: no cleanup, no finally blocks
        append(frame)
    writer.append_data = append_data
    return writer
prepare.open_video = crashing_open_video
prepare.main(sys.argv[2:])
"""


def test_crash_mid_run_then_rerun(tmp_path):
    src_dir, out = tmp_path / "in", str(tmp_path / "out")
    src_dir.mkdir()
    clips = ["clip_1", "clip_2", "clip_3"]
    sources = {c: tfw.write_segment(str(src_dir / f"{c}.tfrecord"), c, 6) for c in clips}
    crash_at = 6 * 5 + 13  # the 13th camera frame of the second clip
    run = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(crash_at), "--waymo", str(src_dir), "--out", out],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 3, run.stderr
    finished = [os.path.join("videos", c, "clip_1.mp4") for c in prepare.CAMERAS] + \
        [os.path.join("metas", c, "clip_1.txt") for c in prepare.CAMERAS]
    visible = [f for f in dataset_files(out) if not f.startswith(".staging")]
    assert sorted(visible) == sorted(finished)  # clip_1 complete; nothing of clip_2 outside the staging folder
    stamp = os.stat(os.path.join(out, finished[0])).st_mtime_ns

    run = subprocess.run([sys.executable, "prepare.py", "--waymo", str(src_dir), "--out", out], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "2 converted, 1 already done, 0 failed" in run.stderr
    for clip in clips:
        check_clip(out, clip, sources[clip])
    assert os.stat(os.path.join(out, finished[0])).st_mtime_ns == stamp  # skipped, not rewritten
    assert len(dataset_files(out)) == 3 * 10  # no staging left-overs


def test_commit_makes_a_clip_visible_last(tmp_path, monkeypatch):
    """Loaders list clips from pinhole_side_left's videos: that file moves last, so a crash hides the clip."""
    out = str(tmp_path)
    stage = prepare.stage_dir(out, "c")
    for cam in prepare.CAMERAS:
        open(os.path.join(stage, cam + ".mp4"), "wb").close()
    moved, real_replace = [], os.replace

    def crash_before_last(src, dst):
        if len(moved) == 9:
            raise OSError("crash")
        moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_before_last)
    with pytest.raises(OSError, match="crash"):
        prepare.commit_clip(out, "c", stage, {cam: "x" for cam in prepare.CAMERAS})
    assert len(moved) == 9 and not prepare.clip_is_done(out, "c")
    assert not os.path.exists(prepare.clip_paths(out, "c")["pinhole_side_left"][0])


def test_a_run_leaves_another_runs_staging_alone(tmp_path):
    out = tmp_path / "out"
    busy = out / ".staging" / "clip_of_another_run"
    busy.mkdir(parents=True)
    (busy / "pinhole_front.mp4").write_bytes(b"half")
    prepare.write_synthetic_dataset(str(out), 1, num_frames=3)
    assert (busy / "pinhole_front.mp4").read_bytes() == b"half"
    (busy / "pinhole_front.mp4").unlink()
    busy.rmdir()
    prepare.write_synthetic_dataset(str(out), 2, num_frames=3)
    assert not (out / ".staging").exists()  # nothing staged any more: the folder goes


# ----------------------------------------------------------------------------------------------
# synthetic data set

def test_synthetic_dataset_layout_and_determinism(tmp_path):
    out = str(tmp_path / "synth")
    names = prepare.write_synthetic_dataset(out, 2, num_frames=6, seed=3)  # default 64x96
    assert names == sorted(names) and len(set(names)) == 2
    for clip in names:
        for cam in prepare.CAMERAS:
            frames, meta = read_video(os.path.join(out, "videos", cam, clip + ".mp4"))
            assert frames.shape == (6, 64, 96, 3) and meta["fps"] == 10.0
            caption = open(os.path.join(out, "metas", cam, clip + ".txt")).read()
            assert caption.startswith(prepare.VIEW_PREFIX[cam] + " A car drives along a straight")
    # The videos hold the rendered frames, up to codec error (larger than on the smooth test images: yuv420p
    # halves the chroma resolution at the many sharp colour edges of a 64x96 street); the scene is a function
    # of (seed, index) only.
    rendered = prepare.render_clip(prepare.sample_scene(np.random.default_rng([3, 1]), 6), 64, 96)
    other = prepare.render_clip(prepare.sample_scene(np.random.default_rng([3, 0]), 6), 64, 96)
    for cam in prepare.CAMERAS:
        frames, _ = read_video(os.path.join(out, "videos", cam, names[1] + ".mp4"))
        own = np.abs(frames.astype(int) - rendered[cam]).mean()
        assert own < 5.0, (cam, own)
        assert np.abs(frames.astype(int) - other[cam]).mean() > 3 * own, cam
    # The CLI writes the same clips and skips finished ones.
    assert prepare.main(["--synthetic", "2", "--out", out, "--frames", "6", "--seed", "3"]) == 0
    assert len(dataset_files(out)) == 2 * 10


def project_box(camera, origin, lo, hi, width, height):
    """Pixel bounding box (u0, v0, u1, v1) of a world box's 8 corners, float64, built from rotation matrices."""
    yaw, pitch = math.radians(prepare.CAM_YAW_DEG[camera]), math.radians(prepare.CAM_PITCH_DEG)
    rz = np.array([[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]])
    ry = np.array([[math.cos(pitch), 0, math.sin(pitch)], [0, 1, 0], [-math.sin(pitch), 0, math.cos(pitch)]])
    flu_to_cv = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], float)  # columns: right, down, forward in FLU
    world_from_cv = rz @ ry @ flu_to_cv
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    cam = (corners - origin) @ world_from_cv  # rows: (x right, y down, z forward)
    if (cam[:, 2] <= 0.1).any():
        return None  # partly behind the camera: the corners do not bound the image of the box
    f = (width / 2) / math.tan(math.radians(prepare.CAM_HFOV_DEG) / 2)
    u, v = f * cam[:, 0] / cam[:, 2] + width / 2, f * cam[:, 1] / cam[:, 2] + height / 2
    return u.min(), v.min(), u.max(), v.max()


def test_synthetic_cameras_see_one_consistent_world():
    """A car passing the ego car lands where an independent pinhole projection puts it, in every camera."""
    scene = prepare.sample_scene(np.random.default_rng(0), 30)
    car = dict(kind="car", color="red", rgb=(0.8, 0.1, 0.1), y=3.5, x0=14.0, speed=-8.0, length=4.6, width=1.9,
               height=1.5, oncoming=True, lane=0)
    scene.update(vehicles=[car], facades={}, ego_speed=8.0)
    height, width = 96, 144
    seen = {}
    for i in range(0, 30, 2):
        t = i / prepare.FPS
        x = car["x0"] + car["speed"] * t
        lo, hi = (x - 2.3, 3.5 - 0.95, 0.15), (x + 2.3, 3.5 + 0.95, 1.5)
        origin = np.array([scene["ego_speed"] * t, 0.0, prepare.CAM_HEIGHT])
        for cam in prepare.CAMERAS:
            image, ids = prepare.render_view(scene, cam, t, height, width, return_ids=True)
            rows, cols = np.nonzero(ids == 0)
            if len(rows) == 0:
                continue
            seen.setdefault(i, []).append(cam)
            box = project_box(cam, origin, lo, hi, width, height)
            if box is None:
                continue
            u0, v0, u1, v1 = box
            # every car pixel centre lies inside the projected box (rays go through pixel centres)
            assert cols.min() + 0.5 >= u0 and cols.max() + 0.5 <= u1 and rows.min() + 0.5 >= v0 \
                and rows.max() + 0.5 <= v1, (cam, i)
            inside = max(0, min(u1, width) - max(u0, 0)) * max(0, min(v1, height) - max(v0, 0))
            if u0 >= 0 and u1 <= width and v0 >= 0 and v1 <= height:  # fully in view: it fills its box
                assert len(rows) > 0.5 * inside, (cam, i, len(rows), inside)
    cams_seen = {c for cs in seen.values() for c in cs}
    # It starts ahead, then passes on the left: front, front_left and side_left all see it, sometimes two at once.
    assert {"pinhole_front", "pinhole_front_left", "pinhole_side_left"} <= cams_seen
    assert any(len(cs) >= 2 for cs in seen.values())
    assert "pinhole_front_right" not in cams_seen and "pinhole_side_right" not in cams_seen
