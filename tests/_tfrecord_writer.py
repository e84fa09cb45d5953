"""Write Waymo-like .tfrecord segments for tests and benchmarks, independently of prepare.py.

Nothing here imports prepare.py's reader: the CRC32C is a bitwise pure-Python implementation, and the
Frame protobuf is built from the field numbers of shared/reference/data.md section 1.2, so the tests
check prepare.py against a second implementation of the format.

    python tests/_tfrecord_writer.py --out /tmp/bench --frames 200   # one native-resolution segment
"""

import io
import struct

import numpy as np
from PIL import Image

# CameraName.Name enum values, and the order a real Waymo frame stores its images in (not enum order).
FRONT, FRONT_LEFT, FRONT_RIGHT, SIDE_LEFT, SIDE_RIGHT = 1, 2, 3, 4, 5
ENUM_TO_FOLDER = {FRONT: "pinhole_front", FRONT_LEFT: "pinhole_front_left", FRONT_RIGHT: "pinhole_front_right",
                  SIDE_LEFT: "pinhole_side_left", SIDE_RIGHT: "pinhole_side_right"}
REAL_ORDER = [FRONT, FRONT_LEFT, SIDE_LEFT, FRONT_RIGHT, SIDE_RIGHT]
# Native (width, height) per camera, and a scaled-down version (1/20, rounded to even) for fast tests.
NATIVE_SIZE = {FRONT: (1920, 1280), FRONT_LEFT: (1920, 1280), FRONT_RIGHT: (1920, 1280),
               SIDE_LEFT: (1920, 886), SIDE_RIGHT: (1920, 886)}
SMALL_SIZE = {cam: (w // 20, (h // 20) // 2 * 2) for cam, (w, h) in NATIVE_SIZE.items()}  # 96x64, 96x44


# ----------------------------------------------------------------------------------------------
# CRC32C (Castagnoli), bit by bit: slow but obviously the textbook definition

def crc32c_bitwise(data):
    """Reflected CRC32C, polynomial 0x82F63B78, init and final xor 0xFFFFFFFF."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def mask(crc):
    """TensorFlow's CRC mask: rotate right by 15, add 0xA282EAD8 (mod 2^32)."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(payload, crc=crc32c_bitwise):
    """One TFRecord: u64 length, masked crc of the length bytes, payload, masked crc of the payload."""
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", mask(crc(length))) + payload + struct.pack("<I", mask(crc(payload)))


# ----------------------------------------------------------------------------------------------
# Protobuf wire encoding (proto2, just the types Frame needs)

def varint(n):
    """Base-128 varint; negative int64 values take ten bytes (two's complement), as protobuf does."""
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def f_varint(field, n):
    return varint(field << 3 | 0) + varint(n)


def f_bytes(field, data):
    return varint(field << 3 | 2) + varint(len(data)) + data


def f_double(field, x):
    return varint(field << 3 | 1) + struct.pack("<d", x)


def transform(matrix):
    """Transform message: 16 unpacked doubles (field 1, wire type 1), as real Waymo files store them."""
    return b"".join(f_double(1, float(v)) for v in np.asarray(matrix, np.float64).reshape(16))


def camera_image(cam, jpeg, t):
    """CameraImage: name, JPEG, pose, pose_timestamp, plus a velocity message we expect to be skipped."""
    return (f_varint(1, cam) + f_bytes(2, jpeg) + f_bytes(3, transform(np.eye(4)))
            + f_bytes(4, f_bytes(1, b"\x00" * 12)) + f_double(5, 1.5e9 + t) + f_double(6, 0.01))


def context(name, sizes):
    """Context: name, one CameraCalibration per camera (width/height/intrinsics), stats strings."""
    calib = b"".join(
        f_bytes(2, f_varint(1, cam) + b"".join(f_double(2, v) for v in (2000.0, 2000.0, w / 2, h / 2, 0, 0, 0, 0, 0))
                + f_bytes(3, transform(np.eye(4))) + f_varint(4, w) + f_varint(5, h) + f_varint(6, 2))
        for cam, (w, h) in sorted(sizes.items()))
    stats = f_bytes(4, f_bytes(2, b"Day") + f_bytes(3, b"location_sf") + f_bytes(4, b"sunny"))
    return f_bytes(1, name.encode()) + calib + stats


def encode_frame(name, timestamp_micros, images, sizes, extra_lidar=b"\x17" * 300):
    """Frame: context, timestamp, pose, images [(enum, jpeg bytes)] in the given order, and fake lidar/labels."""
    out = f_bytes(1, context(name, sizes)) + f_varint(2, timestamp_micros) + f_bytes(3, transform(np.eye(4)))
    for cam, jpeg in images:
        out += f_bytes(4, camera_image(cam, jpeg, timestamp_micros * 1e-6))
    out += f_bytes(5, extra_lidar) + f_bytes(6, b"\x08\x01") + f_bytes(11, f_double(1, 0.0))
    return out


# ----------------------------------------------------------------------------------------------
# Test images: smooth, different per camera, changing over time (so swaps and off-by-one frames show)

def test_image(cam, t, width, height):
    """uint8 (H, W, 3): a per-camera colour ramp that shifts with t, plus a soft disc moving right.

    Neighbouring cameras differ by about 20 levels and neighbouring frames by about 7 (t <= 10 stays unclipped).
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    xx, yy = xx / width, yy / height
    base = np.stack([20 + 20 * cam + 60 * xx + 7 * t, 220 - 25 * cam + 30 * yy - 7 * t,
                     40 + 25 * cam + 50 * xx * yy], -1)
    d2 = (xx - 0.2 - 0.06 * t) ** 2 + ((yy - 0.5) * height / width) ** 2
    disc = np.exp(-d2 / 0.01)[..., None] * np.array([-15.0, 15.0, 70.0])
    return np.clip(base + disc, 0, 255).round().astype(np.uint8)


def jpeg_bytes(rgb, quality=95):
    """Baseline JPEG of an RGB uint8 image."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode(jpeg):
    """What any decoder should give back for our JPEG (the reference for pixel agreement)."""
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def write_segment(path, name, num_frames, sizes=None, order=REAL_ORDER, frame_hook=None, images_fn=test_image,
                  quality=95, crc=crc32c_bitwise, keep_sources=True):
    """Write one segment file; returns {enum: [decoded source frames]} for comparison.

    frame_hook(index, images) may edit the list of (enum, jpeg) pairs of a frame to build bad input.
    """
    sizes = sizes or SMALL_SIZE
    sources = {cam: [] for cam in sizes}
    with open(path, "wb") as f:
        for i in range(num_frames):
            images = []
            for cam in order:
                jpeg = jpeg_bytes(images_fn(cam, i, *sizes[cam]), quality)
                if keep_sources:
                    sources[cam].append(decode(jpeg))
                images.append((cam, jpeg))
            if frame_hook is not None:
                images = frame_hook(i, images)
            f.write(frame_record(encode_frame(name, 1_550_000_000_000_000 + 100_000 * i, images, sizes), crc))
    return sources


# ----------------------------------------------------------------------------------------------
# Benchmark segment: synthetic street scenes at native Waymo resolution, with sensor-like noise

if __name__ == "__main__":
    import argparse
    import os
    import sys
    import time

    import google_crc32c

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import prepare  # only for the scene renderer: the bytes on disk are still produced by this file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the .tfrecord")
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--name", default="1000000000000000000_0_000_20_000")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the camera images")
    args = parser.parse_args()

    os.makedirs(args.out, exist_ok=True)
    scene = prepare.sample_scene(np.random.default_rng(0), args.frames)
    rng = np.random.default_rng(1)
    noise = [rng.normal(0, 3.0, (1280, 1920, 3)).astype(np.float32) for _ in range(7)]  # sensor-like grain

    def scene_image(cam, t, width, height):
        """Render at a quarter of the size (full-size ray casting is too slow here), upscale, add grain."""
        small = prepare.render_view(scene, ENUM_TO_FOLDER[cam], t / prepare.FPS, height // 4 // 2 * 2, width // 4)
        big = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), np.float32)
        return np.clip(big + noise[(t * 5 + cam) % len(noise)][:height, :width], 0, 255).astype(np.uint8)

    t0 = time.time()
    path = os.path.join(args.out, f"segment-{args.name}_with_camera_labels.tfrecord")
    write_segment(path, args.name, args.frames, sizes=NATIVE_SIZE, images_fn=scene_image,
                  quality=args.quality, crc=google_crc32c.value, keep_sources=False)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.0f} MB, {args.frames} frames) in {time.time() - t0:.0f} s")
