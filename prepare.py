"""Waymo Perception segments (or synthetic street scenes) -> per-camera mp4 videos + captions.

Writes the layout that embed.py and train.py read:

    OUT/videos/pinhole_<camera>/<clip>.mp4   H.264 (libx264 crf 18, yuv420p), 10 fps, one video frame per record
    OUT/metas/pinhole_<camera>/<clip>.txt    the caption, UTF-8, one line

for the cameras front, front_left, front_right, side_left and side_right. <clip> is the segment's context name
(e.g. 10017090168044687777_6380_000_6400_000), the same in all ten folders.

    python prepare.py --waymo ~/waymo/training --out datasets/waymo -n 4 --captions waymo_multiview_texts.json
    python prepare.py --waymo a.tfrecord b.tfrecord --out datasets/waymo --prompt "A video of car driving on the road."
    python prepare.py --synthetic 16 --out datasets/synthetic        # the small built-in data set (demo, tests)

No TensorFlow and no protobuf library: the TFRecord framing and the Frame message are decoded by hand
(shared/reference/data.md, sections 1.1 and 1.2). Each clip is staged in OUT/.staging/<clip>/ and moved into
place only when all ten files are complete, so a crash never leaves partial files behind, and a re-run skips
finished clips and redoes the rest. A bad segment fails with its file, record index and problem; the others
still convert, and the command exits non-zero with a summary.
"""

import argparse
import csv
import functools
import io
import json
import math
import multiprocessing
import os
import shutil
import struct
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

import google_crc32c
import imageio.v2 as imageio
import numpy as np
from PIL import Image
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------
# Cameras, captions, video settings

# Left to right around the car: the order of camera_keys in the reference Waymo training config.
CAMERAS = ["pinhole_side_left", "pinhole_front_left", "pinhole_front", "pinhole_front_right", "pinhole_side_right"]
# CameraName.Name enum -> folder. A Frame stores its images in no fixed order, so images are keyed by this enum.
CAMERA_ENUM = {1: "pinhole_front", 2: "pinhole_front_left", 3: "pinhole_front_right",
               4: "pinhole_side_left", 5: "pinhole_side_right"}
FPS = 10  # Waymo cameras run at 10 Hz; we keep every frame, no resampling
CRF = 18  # x264 constant rate factor: 18 is close to visually lossless (the reference converter used 25)
# x264 speed preset. On a native-resolution benchmark segment "veryfast" used 2.7x less CPU than x264's default
# "medium" at the same quality (42.5 dB PSNR at crf 18) and size; "medium" may give smaller files on real footage.
PRESET = "veryfast"
DEFAULT_PROMPT = "A video of car driving on the road."  # the constant prompt of the reference docs
# How the reference caption sets say which camera a caption comes from (the CSV captions start with the front one).
_MOUNT = "The video is captured from a camera mounted on a car."
VIEW_PREFIX = {
    "pinhole_front": f"{_MOUNT} The camera is facing forward.",
    "pinhole_front_left": f"{_MOUNT} The camera is facing forward and slightly to the left.",
    "pinhole_front_right": f"{_MOUNT} The camera is facing forward and slightly to the right.",
    "pinhole_side_left": f"{_MOUNT} The camera is facing to the left.",
    "pinhole_side_right": f"{_MOUNT} The camera is facing to the right.",
}


class SegmentError(Exception):
    """A segment that cannot be converted; the message names the file, the record and the problem."""

    def __init__(self, path, record, problem):
        where = "" if record is None else f" record {record}:"
        super().__init__(f"{path}:{where} {problem}")


# ----------------------------------------------------------------------------------------------
# TFRecord framing: [u64 length][u32 masked crc32c(length)][payload][u32 masked crc32c(payload)], little-endian

def masked_crc32c(data):
    """TFRecord's checksum: CRC32C (Castagnoli), rotated right by 15 bits, plus 0xA282EAD8, all mod 2^32."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path):
    """Yield (index, payload bytes) for every record of a .tfrecord file, verifying both checksums."""
    with open(path, "rb") as f:
        index = 0
        while True:
            header = f.read(12)
            if not header:
                return  # clean end of file
            if len(header) < 12:
                raise SegmentError(path, index, f"truncated record: header has {len(header)} of 12 bytes")
            length_bytes, (length_crc,) = header[:8], struct.unpack("<I", header[8:])
            if masked_crc32c(length_bytes) != length_crc:
                raise SegmentError(path, index, "CRC mismatch in the record header (corrupt length)")
            (length,) = struct.unpack("<Q", length_bytes)
            payload = f.read(length)
            if len(payload) < length:
                raise SegmentError(path, index, f"truncated record: payload has {len(payload)} of {length} bytes")
            footer = f.read(4)
            if len(footer) < 4:
                raise SegmentError(path, index, "truncated record: payload CRC missing")
            if masked_crc32c(payload) != struct.unpack("<I", footer)[0]:
                raise SegmentError(path, index, "CRC mismatch in the record payload (corrupt data)")
            yield index, payload
            index += 1


# ----------------------------------------------------------------------------------------------
# Protobuf wire format, just enough of waymo.open_dataset.Frame (field numbers from dataset.proto)

def read_varint(buf, pos):
    """Decode a base-128 varint at buf[pos]; returns (value, next position)."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("protobuf: varint runs past the end of the message")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise ValueError("protobuf: varint longer than 10 bytes")


def iter_fields(buf):
    """Yield (field number, wire type, value) of a message: an int for varints, a memoryview otherwise."""
    buf = memoryview(buf)
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:  # varint
            value, pos = read_varint(buf, pos)
        elif wire == 1:  # fixed64 (double)
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:  # length-delimited: bytes, strings, sub-messages, packed arrays
            size, pos = read_varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:  # fixed32 (float)
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"protobuf: unsupported wire type {wire} (field {field})")
        if pos > end:
            raise ValueError(f"protobuf: field {field} runs past the end of the message")
        yield field, wire, value


def parse_frame(payload):
    """Frame bytes -> (context name, timestamp_micros or None, {camera folder: JPEG bytes}).

    Frame: context = 1 (Context: name = 1), timestamp_micros = 2, images = 4 (CameraImage: name = 1, image = 2).
    Everything else (lidar, labels, poses, map) is skipped by length without being decoded.
    """
    name, timestamp, images = None, None, {}
    for field, wire, value in iter_fields(payload):
        if field == 1 and wire == 2:
            for sub, sub_wire, sub_value in iter_fields(value):
                if sub == 1 and sub_wire == 2:
                    name = bytes(sub_value).decode("utf-8", errors="replace")
        elif field == 2 and wire == 0:
            timestamp = value - (1 << 64) if value >= 1 << 63 else value  # int64 is two's complement
        elif field == 4 and wire == 2:
            enum, jpeg = None, None
            for sub, sub_wire, sub_value in iter_fields(value):
                if sub == 1 and sub_wire == 0:
                    enum = sub_value
                elif sub == 2 and sub_wire == 2:
                    jpeg = sub_value
            if enum not in CAMERA_ENUM:
                raise ValueError(f"image with unexpected camera enum {enum} (perception segments have 1..5)")
            camera = CAMERA_ENUM[enum]
            if camera in images:
                raise ValueError(f"camera {camera} appears twice in one frame")
            if jpeg is None:
                raise ValueError(f"camera {camera} has no image bytes")
            images[camera] = jpeg
    if not name:
        raise ValueError("frame has no context name")
    return name, timestamp, images


def decode_jpeg(jpeg, size=None):
    """JPEG bytes -> uint8 RGB (H, W, 3) and the source (width, height); resized to size=(W, H) if given."""
    img = Image.open(io.BytesIO(jpeg))
    source_size = img.size
    if size is not None and size != source_size:
        img.draft("RGB", size)  # let libjpeg decode at a reduced scale first when shrinking (much faster)
        img = img.convert("RGB").resize(size, Image.BILINEAR)
    return np.asarray(img.convert("RGB")), source_size


def peek_clip_name(path):
    """The context name of a segment, read from its first record (the clip id used for all file names)."""
    for index, payload in read_records(path):
        try:
            name = parse_frame(payload)[0]
        except ValueError as e:
            raise SegmentError(path, index, str(e)) from None
        if name in ("", ".", "..") or "/" in name or "\\" in name or name.startswith("."):
            raise SegmentError(path, index, f"context name {name!r} cannot be used as a file name")
        return name
    raise SegmentError(path, None, "no records (empty file)")


# ----------------------------------------------------------------------------------------------
# Captions: the Waymo caption CSV (front only), the multiview JSON (per camera), or one prompt for all

def captions_from_front(front):
    """Per-camera captions from a front caption: other cameras get their own camera sentence in front of it."""
    body = front[len(VIEW_PREFIX["pinhole_front"]):].lstrip() if front.startswith(VIEW_PREFIX["pinhole_front"]) \
        else front
    return {cam: front if cam == "pinhole_front" else f"{VIEW_PREFIX[cam]} {body}" for cam in CAMERAS}


def load_captions(path):
    """{clip: {camera: caption}} from a caption file.

    .csv: Waymo's wide caption CSV, no header, row 0 = clip ids, row 1 = front-camera captions.
    .json: one object; keys "<clip>_pinhole_<camera>" (Waymo's multiview captions) or "<clip>" (all cameras).
    """
    try:
        if path.lower().endswith(".csv"):
            with open(path, newline="", encoding="utf-8") as f:
                rows = [row for row in csv.reader(f) if row]
            if len(rows) != 2 or len(rows[0]) != len(rows[1]):
                raise ValueError(f"expected 2 rows of equal length (clip ids, front captions), got {len(rows)} rows; "
                                 "use the JSON format for your own captions")
            return {clip.strip(): captions_from_front(text.strip()) for clip, text in zip(*rows)
                    if text.strip()}  # an empty caption counts as none (embed.py refuses empty captions)
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except (OSError, ValueError, csv.Error) as e:
        raise SystemExit(f"prepare.py: cannot read captions {path}: {e}") from None
    if not isinstance(table, dict):
        raise SystemExit(f"prepare.py: captions {path}: expected a JSON object of caption strings")
    captions = {}
    for key, text in table.items():
        if not isinstance(text, str):
            raise SystemExit(f"prepare.py: captions {path}: value of {key!r} is not a string")
        camera = next((cam for cam in CAMERAS if key.endswith("_" + cam)), None)
        if camera is None:  # a whole-clip caption, used for cameras without their own one
            for cam in CAMERAS:
                captions.setdefault(key, {}).setdefault(cam, text.strip())
        else:
            captions.setdefault(key[:-len(camera) - 1], {})[camera] = text.strip()
    return captions


def clip_captions(clip, table, prompt, source):
    """({camera: caption}, [warnings]) for one clip: from the table, else the prompt, else the default prompt."""
    if table is None:
        return {cam: prompt or DEFAULT_PROMPT for cam in CAMERAS}, []
    found = {cam: text for cam, text in table.get(clip, {}).items() if text}  # empty = no caption
    if not found:
        return ({cam: DEFAULT_PROMPT for cam in CAMERAS},
                [f"warning: clip {clip} has no caption in {source}; using the default prompt {DEFAULT_PROMPT!r}"])
    missing = [cam for cam in CAMERAS if cam not in found]
    warnings = [f"warning: clip {clip} has no {', '.join(missing)} caption in {source}; "
                f"using the default prompt {DEFAULT_PROMPT!r} there"] if missing else []
    return {cam: found.get(cam, DEFAULT_PROMPT) for cam in CAMERAS}, warnings


# ----------------------------------------------------------------------------------------------
# Writing one clip atomically: stage ten files, then os.replace each into place

def open_video(path, crf=CRF, preset=PRESET):
    """imageio/ffmpeg writer: libx264, yuv420p, FPS frames/s; macro_block_size=1 keeps e.g. 886 rows as 886."""
    return imageio.get_writer(path, format="FFMPEG", mode="I", fps=FPS, codec="libx264", pixelformat="yuv420p",
                              quality=None, macro_block_size=1, ffmpeg_log_level="error",
                              output_params=["-crf", str(crf), "-preset", preset])


def clip_paths(out, clip):
    """The ten final paths of a clip: {camera: (mp4, txt)}."""
    return {cam: (os.path.join(out, "videos", cam, clip + ".mp4"), os.path.join(out, "metas", cam, clip + ".txt"))
            for cam in CAMERAS}


def clip_is_done(out, clip):
    """A clip is finished when all ten files exist; they only ever appear complete (staged, then renamed)."""
    return all(os.path.exists(p) for pair in clip_paths(out, clip).values() for p in pair)


def stage_dir(out, clip):
    """A fresh staging folder for a clip (left-overs of a crashed run are removed first)."""
    stage = os.path.join(out, ".staging", clip)
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    return stage


def remove_empty_staging(out):
    """Drop OUT/.staging once nothing is staged; another run on the same --out may still be using it."""
    try:
        os.rmdir(os.path.join(out, ".staging"))
    except OSError:  # missing, or clips of a concurrent run (or a crash's left-overs, removed on re-run)
        pass


def commit_clip(out, clip, stage, captions):
    """Write the captions into the staging folder, then move all ten files into videos/ and metas/."""
    for cam in CAMERAS:
        tmp = os.path.join(stage, cam + ".txt")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(" ".join(captions[cam].split()) + "\n")  # one line: newlines inside captions become spaces
    # Reverse order: the loaders (ours and the official one) list clips from the first camera's videos
    # (CAMERAS[0]), which thus move last: a crash between two renames never shows a half-moved clip.
    for cam, (mp4, txt) in reversed(clip_paths(out, clip).items()):
        os.makedirs(os.path.dirname(mp4), exist_ok=True)
        os.makedirs(os.path.dirname(txt), exist_ok=True)
        os.replace(os.path.join(stage, cam + ".txt"), txt)
        os.replace(os.path.join(stage, cam + ".mp4"), mp4)
    os.rmdir(stage)


def write_clip(out, clip, frames, captions, crf=CRF, preset=PRESET):
    """Encode an iterable of {camera: uint8 (H, W, 3)} into a staged clip, then commit it; returns #frames.

    If the iterable raises (bad input) or anything else fails, the staged files are deleted and nothing moves.
    """
    stage = stage_dir(out, clip)
    writers = {cam: open_video(os.path.join(stage, cam + ".mp4"), crf, preset) for cam in CAMERAS}
    count = 0
    try:
        for views in frames:
            for cam in CAMERAS:
                writers[cam].append_data(views[cam])
            count += 1
        for writer in writers.values():
            writer.close()
        if count == 0:
            raise ValueError("no frames")
        commit_clip(out, clip, stage, captions)
    except BaseException:
        for writer in writers.values():
            try:
                writer.close()
            except Exception:
                pass  # ffmpeg may already be gone; the staged files are deleted either way
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return count


# ----------------------------------------------------------------------------------------------
# Waymo segment -> clip

def segment_frames(path, clip, size=None):
    """Yield {camera: uint8 (H, W, 3)} per record, checking everything that would silently corrupt a clip."""
    sizes, last_time = {}, None
    for index, payload in read_records(path):
        try:
            name, timestamp, images = parse_frame(payload)
        except ValueError as e:
            raise SegmentError(path, index, str(e)) from None
        if name != clip:
            raise SegmentError(path, index, f"context name {name!r} differs from the first record's {clip!r}")
        missing = [cam for cam in CAMERAS if cam not in images]
        if missing:
            raise SegmentError(path, index, f"frame is missing camera(s) {', '.join(missing)}")
        if timestamp is not None and last_time is not None and timestamp <= last_time:
            raise SegmentError(path, index, f"timestamp {timestamp} is not after the previous one {last_time}")
        last_time = timestamp
        views = {}
        for cam in CAMERAS:
            try:
                views[cam], source_size = decode_jpeg(images[cam], size)
            except Exception as e:  # PIL raises several types for broken data
                raise SegmentError(path, index, f"{cam} image is not a decodable JPEG ({e})") from None
            if sizes.setdefault(cam, source_size) != source_size:
                raise SegmentError(path, index, f"{cam} image size changed from {sizes[cam][0]}x{sizes[cam][1]} "
                                                f"to {source_size[0]}x{source_size[1]} inside the segment")
            if size is None and (source_size[0] % 2 or source_size[1] % 2):
                raise SegmentError(path, index, f"{cam} image is {source_size[0]}x{source_size[1]}; "
                                                "H.264 yuv420p needs even sizes (pass --height/--width)")
        yield views


def convert_segment(path, clip, out, captions, size=None, crf=CRF, preset=PRESET):
    """Convert one .tfrecord segment into the clip `clip`; returns a one-line report."""
    t0 = time.time()
    try:
        count = write_clip(out, clip, segment_frames(path, clip, size), captions, crf, preset)
    except SegmentError:
        raise
    except Exception as e:  # ffmpeg, disk full, ...: still name the file
        raise SegmentError(path, None, f"{type(e).__name__}: {e}") from None
    dt = time.time() - t0
    return f"{clip}: {count} frames x {len(CAMERAS)} cameras in {dt:.1f} s ({count / dt:.2f} frames/s)"


def find_segments(inputs):
    """Expand folders to their sorted *.tfrecord files; explicit files are taken as they are (once each)."""
    files, seen = [], set()
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, n) for n in os.listdir(item) if n.endswith(".tfrecord"))
            if not found:
                raise SystemExit(f"prepare.py: no *.tfrecord files in {item}")
        elif os.path.isfile(item):
            found = [item]
        else:
            raise SystemExit(f"prepare.py: {item} does not exist")
        for path in found:
            if os.path.realpath(path) not in seen:
                seen.add(os.path.realpath(path))
                files.append(path)
    return files


# ----------------------------------------------------------------------------------------------
# Synthetic street scenes: a straight road seen by five pinhole cameras around a car driving forward
#
# World axes are x forward, y left, z up (metres); the ego car starts at the origin and drives along +x.
# All five cameras share one centre and differ by yaw, like Waymo's (front 0, front-left/right +-45 deg,
# side-left/right +-90 deg), so anything seen by two neighbouring cameras is the same 3-D object, and moving
# cars cross from one camera into the next consistently.

CAM_YAW_DEG = {"pinhole_front": 0.0, "pinhole_front_left": 45.0, "pinhole_front_right": -45.0,
               "pinhole_side_left": 90.0, "pinhole_side_right": -90.0}
CAM_HEIGHT = 1.6  # metres above the road
CAM_PITCH_DEG = 4.0  # looking slightly down
CAM_HFOV_DEG = 60.0  # horizontal field of view; neighbouring cameras overlap by 15 degrees
LANE_WIDTH = 3.5

LIGHTING = {  # sky zenith, sky horizon, sun direction, ambient, direct, tint
    "on a sunny day": ((0.30, 0.50, 0.90), (0.75, 0.85, 0.95), (0.4, -0.5, 0.75), 0.55, 0.55, (1.0, 1.0, 1.0)),
    "on an overcast day": ((0.55, 0.57, 0.60), (0.80, 0.80, 0.82), (0.0, 0.0, 1.0), 0.85, 0.15, (0.95, 0.97, 1.0)),
    "at dusk": ((0.20, 0.22, 0.45), (0.95, 0.55, 0.30), (-0.8, 0.3, 0.25), 0.40, 0.55, (1.0, 0.78, 0.6)),
}
COLORS = {"red": (0.75, 0.08, 0.06), "blue": (0.10, 0.22, 0.70), "white": (0.90, 0.90, 0.88),
          "black": (0.07, 0.07, 0.08), "silver": (0.62, 0.64, 0.66), "yellow": (0.90, 0.75, 0.10),
          "green": (0.10, 0.45, 0.20)}
BUILDING_COLORS = [(0.72, 0.62, 0.48), (0.55, 0.28, 0.20), (0.60, 0.60, 0.62), (0.80, 0.76, 0.66),
                   (0.40, 0.42, 0.46)]


def sample_scene(rng, num_frames):
    """Random scene parameters (a plain dict): road, lighting, ego speed, vehicles, facades."""
    lanes = int(rng.integers(1, 3))  # lanes per direction; the ego car drives in the rightmost one (y = 0)
    ego_speed = float(rng.uniform(5.0, 14.0))
    duration = num_frames / FPS
    center = LANE_WIDTH / 2 + LANE_WIDTH * (lanes - 1)  # y of the double yellow line
    vehicles = []
    for _ in range(int(rng.integers(2, 7))):
        oncoming = bool(rng.random() < 0.5)
        lane = int(rng.integers(0, lanes))
        y = center + LANE_WIDTH / 2 + LANE_WIDTH * lane if oncoming else LANE_WIDTH * lane
        truck = bool(rng.random() < 0.2)
        length, width, height = (rng.uniform(7, 10), 2.4, rng.uniform(2.8, 3.4)) if truck else \
            (rng.uniform(4.2, 4.9), rng.uniform(1.8, 2.0), rng.uniform(1.4, 1.7))
        if oncoming:  # start ahead so that most of them pass the ego car during the clip
            speed = -float(rng.uniform(6.0, 14.0))
            x0 = float(rng.uniform(5.0, 10.0 + (ego_speed - speed) * duration))
        elif lane == 0:  # ego lane: only vehicles ahead, at least as fast as the ego car
            speed = ego_speed + float(rng.uniform(0.0, 2.0))
            x0 = float(rng.uniform(10.0, 40.0))
        else:
            speed = ego_speed + float(rng.uniform(-3.0, 3.0))
            x0 = float(rng.uniform(-15.0, 35.0))
        color = str(rng.choice(list(COLORS)))
        # Vehicles of one lane must stay 12 m apart (centre to centre) for the whole clip: the gap changes
        # linearly in time, so check both ends and that it does not change sign in between.
        gaps = [(v["x0"] - x0, v["x0"] - x0 + (v["speed"] - speed) * duration) for v in vehicles if v["y"] == y]
        if any(a * b <= 0 or min(abs(a), abs(b)) < 12 for a, b in gaps):
            continue
        vehicles.append(dict(kind="truck" if truck else "car", color=color, rgb=COLORS[color], y=y, x0=x0,
                             speed=speed, length=float(length), width=float(width), height=float(height),
                             oncoming=oncoming, lane=lane))
    facades = {}
    for side, y in (("left", center + LANE_WIDTH * lanes + 4.0), ("right", -LANE_WIDTH / 2 - 4.0)):
        edges, heights, colors, x = [], [], [], -80.0  # buildings along x, each [edge_k, edge_k+1)
        while x < ego_speed * duration + 250.0:
            edges.append(x)
            gap = rng.random() < 0.15
            heights.append(0.0 if gap else float(rng.uniform(5.0, 22.0)))
            colors.append(BUILDING_COLORS[int(rng.integers(len(BUILDING_COLORS)))])
            x += float(rng.uniform(4.0, 8.0) if gap else rng.uniform(8.0, 22.0))
        edges.append(x)
        facades[side] = dict(y=y, edges=np.array(edges), heights=np.array(heights), colors=np.array(colors))
    lighting = str(rng.choice(list(LIGHTING)))
    return dict(lanes=lanes, center=center, ego_speed=ego_speed, lighting=lighting, vehicles=vehicles,
                facades=facades, num_frames=num_frames)


def camera_basis(camera):
    """Unit forward, right and down vectors (OpenCV camera axes) of a synthetic camera, in world axes."""
    yaw, pitch = math.radians(CAM_YAW_DEG[camera]), math.radians(CAM_PITCH_DEG)
    forward = np.array([math.cos(yaw) * math.cos(pitch), math.sin(yaw) * math.cos(pitch), -math.sin(pitch)])
    right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
    return forward, right, np.cross(forward, right)


def focal_length(width):
    """Pinhole focal length in pixels (square pixels, principal point at the image centre)."""
    return (width / 2) / math.tan(math.radians(CAM_HFOV_DEG) / 2)


@functools.lru_cache(maxsize=32)
def camera_rays(camera, height, width):
    """Unit ray directions (H, W, 3) through the pixel centres (cached: cameras only translate)."""
    focal = focal_length(width)
    v, u = np.mgrid[0:height, 0:width]
    forward, right, down = camera_basis(camera)
    rays = (forward + ((u[..., None] + 0.5 - width / 2) / focal) * right
            + ((v[..., None] + 0.5 - height / 2) / focal) * down)
    rays /= np.linalg.norm(rays, axis=-1, keepdims=True)
    rays[rays == 0] = 1e-12  # no exact zeros, so 1/ray below never makes inf * 0 = nan
    rays.flags.writeable = False
    return rays


def vehicle_boxes(scene, t):
    """Axis-aligned boxes at time t: (lo (B, 3), hi (B, 3), rgb (B, 3), vehicle id (B,)), two boxes per vehicle.

    A car is a body plus a glass cabin set back from its front; a truck is a cargo box plus a lower cab in front.
    """
    lo, hi, rgb, ids = [], [], [], []
    for k, v in enumerate(scene["vehicles"]):
        x, y, half_l, half_w, h = v["x0"] + v["speed"] * t, v["y"], v["length"] / 2, v["width"] / 2, v["height"]
        front = 1.0 if v["speed"] >= 0 else -1.0  # spans below are written for a vehicle facing +x, then mirrored
        if v["kind"] == "car":  # (from, to along the vehicle, half width, bottom, top, colour)
            parts = [(-half_l, half_l, half_w, 0.15, 0.55 * h, v["rgb"]),
                     (-0.55 * half_l, 0.30 * half_l, 0.9 * half_w, 0.55 * h, h, (0.12, 0.15, 0.20))]
        else:
            parts = [(-half_l, half_l - 2.2, half_w, 0.3, h, v["rgb"]),
                     (half_l - 2.0, half_l, half_w, 0.3, 0.75 * h, (0.25, 0.27, 0.30))]
        for a, b, w, bottom, top, color in parts:
            x_lo, x_hi = sorted((x + front * a, x + front * b))
            lo.append((x_lo, y - w, bottom)), hi.append((x_hi, y + w, top)), rgb.append(color), ids.append(k)
    if not lo:
        return np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0, int)
    return np.array(lo), np.array(hi), np.array(rgb), np.array(ids)


def _noise(x, y):
    """Deterministic value noise in [0, 1) on a 1 m grid, bilinearly interpolated (road and grass texture)."""
    def lattice(i, j):
        h = (i * 374761393 + j * 668265263) & 0xFFFFFFFF
        h = ((h ^ (h >> 13)) * 1274126177) & 0xFFFFFFFF
        return (h & 0xFFFF) / 65536.0
    ix, iy = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = x - ix, y - iy
    return ((lattice(ix, iy) * (1 - fx) + lattice(ix + 1, iy) * fx) * (1 - fy)
            + (lattice(ix, iy + 1) * (1 - fx) + lattice(ix + 1, iy + 1) * fx) * fy)


def _ground_color(scene, gx, gy):
    """Road (asphalt, lane markings), sidewalks and grass at ground points (N,) -> (N, 3)."""
    lanes, center = scene["lanes"], scene["center"]
    left_edge, right_edge = center + LANE_WIDTH * lanes, -LANE_WIDTH / 2
    asphalt = 0.30 + 0.06 * _noise(gx * 1.5, gy * 1.5)
    color = np.stack([asphalt, asphalt, asphalt * 1.03], -1)
    paint = np.zeros_like(gx, dtype=bool)
    yellow = (np.abs(gy - center - 0.15) < 0.07) | (np.abs(gy - center + 0.15) < 0.07)  # double yellow line
    for k in range(1, lanes):  # dashed white lines between lanes of one direction: 3 m paint, 9 m gap
        dashes = (np.mod(gx, 12.0) < 3.0)
        paint |= dashes & ((np.abs(gy - (center - LANE_WIDTH * k)) < 0.08) |
                           (np.abs(gy - (center + LANE_WIDTH * k)) < 0.08))
    paint |= (np.abs(gy - right_edge - 0.2) < 0.08) | (np.abs(gy - left_edge + 0.2) < 0.08)  # edge lines
    color[paint] = (0.85, 0.85, 0.82)
    color[yellow] = (0.85, 0.68, 0.12)
    curb = (gy < right_edge) | (gy > left_edge)
    sidewalk = curb & (gy > right_edge - 3.0) & (gy < left_edge + 3.0)
    tiles = 0.58 + 0.05 * ((np.floor(gx / 1.5) + np.floor(gy / 1.5)) % 2)  # paving slabs
    color[sidewalk] = np.stack([tiles, tiles, tiles * 0.97], -1)[sidewalk]
    grass = curb & ~sidewalk
    g = 0.75 + 0.5 * _noise(gx * 0.7, gy * 0.7)
    color[grass] = (np.stack([0.20 * g, 0.42 * g, 0.15 * g], -1))[grass]
    return color


def render_view(scene, camera, t, height, width, supersample=2, return_ids=False):
    """Ray-cast one camera at time t (seconds) -> uint8 (H, W, 3) [and int (H, W) vehicle ids, -1 = none].

    Each pixel averages supersample^2 rays (anti-aliasing). Scene order: sky < facades/ground < vehicles, by depth.
    """
    s = supersample if not return_ids else 1
    hh, ww = height * s, width * s
    rays = camera_rays(camera, hh, ww).reshape(-1, 3)  # (N, 3)
    origin = np.array([scene["ego_speed"] * t, 0.0, CAM_HEIGHT])
    zenith, horizon, sun, ambient, direct, tint = LIGHTING[scene["lighting"]]
    sun = np.array(sun) / np.linalg.norm(sun)
    n = rays.shape[0]
    up = np.clip(rays[:, 2:3], 0, 1) ** 0.6
    color = np.array(horizon) * (1 - up) + np.array(zenith) * up  # sky
    depth = np.full(n, np.inf)
    ids = np.full(n, -1)

    # Ground plane z = 0 (only rays that go down).
    down = rays[:, 2] < -1e-6
    t_ground = np.where(down, -origin[2] / np.where(down, rays[:, 2], -1.0), np.inf)
    hit = np.isfinite(t_ground)
    gx, gy = origin[0] + t_ground[hit] * rays[hit, 0], origin[1] + t_ground[hit] * rays[hit, 1]
    shade = np.ones(hit.sum())
    for v in scene["vehicles"]:  # soft contact shadow under each vehicle
        x = v["x0"] + v["speed"] * t
        inside = (np.abs(gx - x) < v["length"] / 2 + 0.3) & (np.abs(gy - v["y"]) < v["width"] / 2 + 0.3)
        shade[inside] = 0.45
    color[hit] = _ground_color(scene, gx, gy) * (ambient + direct * sun[2]) * shade[:, None]
    depth[hit] = t_ground[hit]

    # Facades: one vertical plane per side of the street, cut into buildings of different heights.
    for side, facade in scene["facades"].items():
        toward = rays[:, 1] > 1e-6 if side == "left" else rays[:, 1] < -1e-6
        t_wall = np.where(toward, (facade["y"] - origin[1]) / np.where(toward, rays[:, 1], 1.0), np.inf)
        wx, wz = origin[0] + t_wall * rays[:, 0], origin[2] + t_wall * rays[:, 2]
        k = np.clip(np.searchsorted(facade["edges"], wx, side="right") - 1, 0, len(facade["heights"]) - 1)
        hit = toward & (t_wall < depth) & (wz >= 0) & (wz < facade["heights"][k]) & (wx >= facade["edges"][0])
        rgb = facade["colors"][k[hit]]
        local_x = wx[hit] - facade["edges"][k[hit]]
        window = (np.mod(local_x, 3.0) > 0.9) & (np.mod(local_x, 3.0) < 2.2) & (np.mod(wz[hit], 3.2) > 1.1) \
            & (np.mod(wz[hit], 3.2) < 2.4) & (wz[hit] > 2.0)
        rgb[window] = (0.16, 0.20, 0.26)
        normal = np.array([0.0, -1.0 if side == "left" else 1.0, 0.0])
        color[hit] = rgb * (ambient + direct * max(0.0, float(normal @ sun)))
        depth[hit] = t_wall[hit]

    # Vehicles: ray/box slab test, box by box, only for the pixels inside the box's projected rectangle.
    forward, right, down = camera_basis(camera)
    focal = focal_length(ww)
    rays_grid, color_grid = rays.reshape(hh, ww, 3), color.reshape(hh, ww, 3)
    depth_grid, ids_grid = depth.reshape(hh, ww), ids.reshape(hh, ww)
    for lo, hi, rgb, k in zip(*vehicle_boxes(scene, t)):
        corners = np.stack(np.meshgrid(*zip(lo, hi), indexing="ij"), -1).reshape(8, 3) - origin
        z = corners @ forward
        if z.max() <= 0:
            continue  # behind the camera
        if z.min() > 0.1:  # fully in front: the box projects inside the rectangle of its corners
            u, v = focal * (corners @ right) / z + ww / 2, focal * (corners @ down) / z + hh / 2
            u0, u1 = max(int(u.min()) - 1, 0), min(int(u.max()) + 2, ww)
            v0, v1 = max(int(v.min()) - 1, 0), min(int(v.max()) + 2, hh)
            if u0 >= u1 or v0 >= v1:
                continue
        else:  # straddles the image plane: test every pixel
            u0, u1, v0, v1 = 0, ww, 0, hh
        r = rays_grid[v0:v1, u0:u1]
        t1, t2 = (lo - origin) / r, (hi - origin) / r  # (h, w, 3) distances to the three pairs of slabs
        t_min, t_max = np.minimum(t1, t2), np.maximum(t1, t2)
        t_near = np.maximum(np.maximum(t_min[..., 0], t_min[..., 1]), t_min[..., 2])
        t_far = np.minimum(np.minimum(t_max[..., 0], t_max[..., 1]), t_max[..., 2])
        hit = (t_near <= t_far) & (t_near > 0) & (t_near < depth_grid[v0:v1, u0:u1])
        if not hit.any():
            continue
        axis = t_min[hit].argmax(-1)  # the face the ray entered through
        normal = np.zeros((len(axis), 3))
        normal[np.arange(len(axis)), axis] = -np.sign(r[hit][np.arange(len(axis)), axis])
        color_grid[v0:v1, u0:u1][hit] = rgb * (ambient + direct * np.clip(normal @ sun, 0, None))[:, None]
        depth_grid[v0:v1, u0:u1][hit] = t_near[hit]
        ids_grid[v0:v1, u0:u1][hit] = k

    # Aerial perspective: far things fade towards the horizon colour.
    fog = np.exp(-np.where(np.isfinite(depth), depth, 0.0) / 180.0)[:, None]
    finite = np.isfinite(depth)
    color[finite] = color[finite] * fog[finite] + np.array(horizon) * (1 - fog[finite])
    image = (color * np.array(tint)).reshape(height, s, width, s, 3).mean((1, 3))  # box-filter the supersamples
    image = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return (image, ids.reshape(height, width)) if return_ids else image


def describe_scene(scene):
    """One caption of the whole scene (the camera sentence is added per view)."""
    road = "two-lane road" if scene["lanes"] == 1 else "four-lane road with two lanes in each direction"
    kmh = 5 * round(scene["ego_speed"] * 3.6 / 5)
    text = f"A car drives along a straight {road} lined with buildings {scene['lighting']}, at about {kmh} km/h."
    parts = []
    for v in sorted(scene["vehicles"], key=lambda v: abs(v["x0"])):
        if v["oncoming"]:
            where = "in the oncoming lane" + ("s" if scene["lanes"] > 1 else "")
        elif v["lane"] == 0:
            where = "ahead in the same lane"
        else:
            where = f"{'ahead' if v['x0'] > 0 else 'behind'} in the left lane"
        parts.append(f"a {v['color']} {v['kind']} {where}")
    if not parts:
        return text + " There is no other traffic."
    many = len(parts) > 1
    return text + f" There {'are' if many else 'is'} {len(parts)} other vehicle{'s' if many else ''}: " \
        + ", ".join(parts) + "."


def render_clip(scene, height, width, supersample=2):
    """{camera: uint8 (T, H, W, 3)} for all frames of a scene."""
    return {cam: np.stack([render_view(scene, cam, i / FPS, height, width, supersample)
                           for i in range(scene["num_frames"])]) for cam in CAMERAS}


def synthetic_clip(out, clip, index, seed, num_frames, height, width, crf=CRF, preset=PRESET):
    """Render and write one synthetic clip (scene drawn from rng(seed, index)); returns a one-line report."""
    t0 = time.time()
    scene = sample_scene(np.random.default_rng([seed, index]), num_frames)
    videos = render_clip(scene, height, width)
    description = describe_scene(scene)
    captions = {cam: f"{VIEW_PREFIX[cam]} {description}" for cam in CAMERAS}
    frames = ({cam: videos[cam][i] for cam in CAMERAS} for i in range(num_frames))
    count = write_clip(out, clip, frames, captions, crf, preset)
    return f"{clip}: {count} frames x {len(CAMERAS)} cameras in {time.time() - t0:.1f} s"


def synthetic_name(seed, index):
    """Clip ids of the synthetic set; the seed is part of the name so that two seeds never collide."""
    return f"synthetic_s{seed}_{index:05d}"


def synthetic_jobs(out_dir, num_clips, num_frames, height, width, seed, crf=CRF, preset=PRESET):
    """(all clip ids, jobs for the clips not finished yet) of a synthetic data set."""
    if height <= 0 or width <= 0 or height % 2 or width % 2:
        raise ValueError(f"height and width must be positive and even (yuv420p), got {height}x{width}")
    names = [synthetic_name(seed, i) for i in range(num_clips)]
    jobs = [dict(out=out_dir, clip=name, index=i, seed=seed, num_frames=num_frames, height=height, width=width,
                 crf=crf, preset=preset) for i, name in enumerate(names) if not clip_is_done(out_dir, name)]
    return names, jobs


def write_synthetic_dataset(out_dir, num_clips, num_frames=33, height=64, width=96, seed=0, workers=1,
                            crf=CRF, preset=PRESET):
    """Write num_clips synthetic clips (skipping finished ones) into out_dir; returns their sorted clip ids.

    Defaults are demo-sized: 33 frames (enough for 29-frame windows), 64x96 pixels (divisible by 16).
    """
    names, jobs = synthetic_jobs(out_dir, num_clips, num_frames, height, width, seed, crf, preset)
    failures = run_jobs(synthetic_clip, jobs, workers, "synthetic")
    remove_empty_staging(out_dir)
    if failures:
        raise RuntimeError("; ".join(failures))
    return names


# ----------------------------------------------------------------------------------------------
# Driver: parallel over clips, progress bar, summary

def _call(fn, job):
    """Run one job, turning an exception into its message (so one bad segment never stops the others)."""
    try:
        return fn(**job), None
    except Exception as e:
        where = str(job.get("path") or job.get("clip", ""))
        return None, str(e) if where in str(e) else f"{where}: {e}"  # every failure names its input


def run_jobs(fn, jobs, workers, desc):
    """Run fn(**job) for each job, in this process (workers <= 1) or in a spawn pool; returns error messages."""
    failures = []
    if not jobs:
        return failures
    bar = tqdm(total=len(jobs), desc=desc, unit="clip", file=sys.stderr)

    def report(job, result, error):
        if error is not None:
            failures.append(error)
            bar.write(f"FAILED {error}", file=sys.stderr)
        else:
            bar.write(result, file=sys.stderr)
        bar.update(1)

    if workers <= 1 or len(jobs) == 1:
        for job in jobs:
            report(job, *_call(fn, job))
    else:
        # spawn, not fork: workers start clean (no inherited threads or ffmpeg pipes of the parent).
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_call, fn, job): job for job in jobs}
            for future in as_completed(futures):
                job = futures[future]
                try:
                    report(job, *future.result())
                except BrokenProcessPool:
                    report(job, None, f"{job.get('path', job['clip'])}: worker process died (out of memory?)")
    bar.close()
    return failures


def main(argv=None):
    """Command line entry point; returns the exit status (0 = everything converted or already there)."""
    parser = argparse.ArgumentParser(description="Waymo .tfrecord segments or synthetic scenes -> mp4 + captions.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--waymo", nargs="+", metavar="DIR_OR_FILE", help="folders of *.tfrecord, or files")
    source.add_argument("--synthetic", type=int, metavar="N", help="write N synthetic clips instead")
    parser.add_argument("--out", required=True, help="dataset root, e.g. datasets/waymo")
    parser.add_argument("-n", "--workers", type=int, default=1, help="segments converted in parallel")
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--captions", help="Waymo caption file: waymo_caption.csv or waymo_multiview_texts.json")
    text.add_argument("--prompt", help=f"one caption for every clip and camera (default {DEFAULT_PROMPT!r})")
    parser.add_argument("--height", type=int, help="output height (Waymo: native unless given; synthetic: 64)")
    parser.add_argument("--width", type=int, help="output width (Waymo: native unless given; synthetic: 96)")
    parser.add_argument("--frames", type=int, default=33, help="frames per synthetic clip")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic scenes")
    parser.add_argument("--crf", type=int, default=CRF, help="x264 quality: lower is better and bigger")
    parser.add_argument("--preset", default=PRESET, help="x264 speed preset (ultrafast ... veryslow)")
    args = parser.parse_args(argv)
    if (args.height is None) != (args.width is None):
        parser.error("--height and --width go together")
    if args.height is not None and (args.height <= 0 or args.width <= 0 or args.height % 2 or args.width % 2):
        parser.error("--height and --width must be positive and even (H.264 yuv420p)")

    if args.synthetic is not None:
        if args.captions or args.prompt:
            parser.error("synthetic clips caption themselves; --captions/--prompt are for --waymo")
        names, jobs = synthetic_jobs(args.out, args.synthetic, args.frames, args.height or 64, args.width or 96,
                                     args.seed, args.crf, args.preset)
        failures = run_jobs(synthetic_clip, jobs, args.workers, "synthetic")
        skipped, converted = len(names) - len(jobs), len(jobs) - len(failures)
    else:
        files = find_segments(args.waymo)
        table = load_captions(args.captions) if args.captions else None
        size = (args.width, args.height) if args.height else None
        jobs, failures, skipped, paths = [], [], 0, {}
        for path in files:  # cheap first pass: clip ids (first record only), duplicates, finished clips, captions
            try:
                clip = peek_clip_name(path)
            except (SegmentError, OSError) as e:
                failures.append(str(e))
                continue
            if clip in paths:
                failures.append(f"{path}: same context name {clip} as {paths[clip]}; skipped")
                continue
            paths[clip] = path
            if clip_is_done(args.out, clip):
                skipped += 1
                continue
            captions, warnings = clip_captions(clip, table, args.prompt, args.captions)
            for warning in warnings:
                print(warning, file=sys.stderr)
            jobs.append(dict(path=path, clip=clip, out=args.out, captions=captions, size=size, crf=args.crf,
                             preset=args.preset))
        for error in failures:
            print(f"FAILED {error}", file=sys.stderr)
        job_failures = run_jobs(convert_segment, jobs, args.workers, "segments")
        converted = len(jobs) - len(job_failures)
        failures += job_failures

    remove_empty_staging(args.out)
    print(f"prepare.py: {converted} converted, {skipped} already done, {len(failures)} failed -> {args.out}",
          file=sys.stderr)
    if failures:
        print("failures:", file=sys.stderr)
        for error in failures:
            print(f"  {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
