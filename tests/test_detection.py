"""Raw photographs: decoding any format (and every bad input), MTCNN detection, converters that detect."""

import io
import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.helpers import run_module
from mvcom_tf.data import alignment, conversion, images, sources, synthetic
from mvcom_tf.data.detection import Face, FaceDetector, choose
from mvcom_tf.evaluation.embedders import load_embedder
from mvcom_tf.data.tfrecord import iterate_records


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def gradient(width=48, height=32) -> np.ndarray:
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    return np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)


def test_every_format_and_mode_decodes_to_upright_rgb():
    rgb = gradient()
    grey = Image.fromarray(rgb).convert("L")
    cases = {
        "png": encoded(Image.fromarray(rgb), "PNG"),
        "pgm": encoded(grey, "PPM"),  # Pillow writes mode L as binary PGM (P5)
        "ppm": encoded(Image.fromarray(rgb), "PPM"),
        "tiff": encoded(Image.fromarray(rgb), "TIFF"),
        "palette": encoded(Image.fromarray(rgb).convert("P"), "PNG"),
        "cmyk_jpeg": encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95),
    }
    for name, data in cases.items():
        decoded = images.decode_rgb(data)
        assert decoded.shape == (32, 48, 3) and decoded.dtype == np.uint8, name
    np.testing.assert_array_equal(images.decode_rgb(cases["png"]), rgb)
    np.testing.assert_array_equal(images.decode_rgb(cases["ppm"]), rgb)
    assert np.all(images.decode_rgb(cases["pgm"]) == np.asarray(grey)[..., None])
    assert np.abs(images.decode_rgb(cases["cmyk_jpeg"]).astype(int) - rgb).mean() < 6  # colours kept
    # Alpha is composited on white: a transparent pixel becomes white, an opaque one keeps its colour.
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:, :10, 3] = 0
    with_alpha = images.decode_rgb(encoded(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert np.all(with_alpha[:, :10] == 255) and np.array_equal(with_alpha[:, 10:], rgb[:, 10:])
    # EXIF orientation 6 (stored turned 90 degrees): the decoded image is upright, portrait.
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = images.decode_rgb(encoded(Image.fromarray(rgb), "JPEG", quality=95, exif=exif.tobytes()))
    assert turned.shape == (48, 32, 3)
    np.testing.assert_allclose(turned.astype(float), np.rot90(rgb, k=-1).astype(float), atol=40)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height grey pixels, with one tiny IDAT: a decompression bomb's header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_bad_inputs_get_their_reasons():
    jpeg = encoded(Image.fromarray(gradient()), "JPEG")
    bad = {
        "truncated": (jpeg[: len(jpeg) // 2], "undecodable_image"),
        "one_pixel": (encoded(Image.new("RGB", (1, 1)), "PNG"), "image_too_small"),
        "not_an_image": (b"%PDF-1.4 not a picture at all" * 10, "undecodable_image"),
        "bomb": (encoded(Image.new("L", (9000, 9000)), "PNG"), "image_too_large"),
        # A header claiming 40000 x 40000: over Pillow's own limit, which raises while opening.
        "huge_header": (png_header_only(40000, 40000), "image_too_large"),
    }
    for name, (data, reason) in bad.items():
        with pytest.raises(images.ImageProblem) as problem:
            images.decode_rgb(data, max_pixels=50_000_000)
        assert problem.value.reason == reason, (name, problem.value)


def faces_on_canvases(count: int, seed: int = 1):
    """Frontal synthetic faces (96 px) on 256 px canvases at known offsets, with their true landmarks."""
    for index in range(count):
        identity = synthetic.make_identity(seed, index, index % 4)
        face, points = synthetic.render_face_with_landmarks(identity, 0.0, 0, 0, 96, np.random.default_rng(index))
        canvas = np.full((256, 256, 3), 110, np.uint8)
        top, left = 40 + (index % 3) * 30, 50 + (index % 4) * 20
        canvas[top:top + 96, left:left + 96] = face
        yield canvas, points + [left, top]


def test_detected_landmarks_match_the_rendered_ones():
    detector = FaceDetector(min_confidence=0.8)
    errors = []
    for canvas, truth in faces_on_canvases(16):
        face = choose(detector.detect(canvas), canvas.shape)
        if face is not None:
            errors.append(np.linalg.norm(face.landmarks - truth, axis=1))
    errors = np.array(errors)
    assert len(errors) >= 6, f"MTCNN found only {len(errors)} of 16 synthetic faces"
    # Eye centres and mouth corners within a few pixels (inter-ocular distance about 20 px here);
    # MTCNN puts the nose a few pixels above the drawn tip.
    assert np.median(errors[:, [0, 1, 3, 4]]) <= 3.5 and np.percentile(errors, 90) <= 9.0, errors.round(1)
    assert choose(detector.detect(np.full((200, 300, 3), 110, np.uint8)), (200, 300, 3)) is None
    # A large image is scaled down for the detector and the landmarks mapped back.
    canvas, truth = next(faces_on_canvases(4))
    big = np.kron(canvas, np.ones((6, 6, 1), np.uint8))  # 1536 px, over the 1024 px cap
    face = choose(FaceDetector(min_confidence=0.8).detect(big), big.shape)
    if face is not None:
        assert np.median(np.linalg.norm(face.landmarks - (truth * 6 + 2.5), axis=1)) <= 3.5 * 6


def test_choose_prefers_the_large_central_face():
    small_central = Face((90, 90, 20, 20), 0.99, np.zeros((5, 2)))
    large_central = Face((60, 60, 80, 80), 0.95, np.zeros((5, 2)))
    large_corner = Face((0, 0, 90, 90), 0.99, np.zeros((5, 2)))
    assert choose([small_central, large_central, large_corner], (200, 200, 3)) is large_central
    assert choose([], (200, 200, 3)) is None


def test_folder_of_photos_converts_with_detection_and_counts_bad_inputs(tmp_path):
    root = tmp_path / "photos"
    for index, (canvas, _) in enumerate(faces_on_canvases(8)):
        person = root / f"person{index % 2}"
        person.mkdir(parents=True, exist_ok=True)
        Image.fromarray(canvas).save(person / f"{index}.jpg", quality=95)
    odd = root / "person0"
    Image.new("RGB", (300, 200), (110, 110, 110)).save(odd / "empty_wall.png")
    (odd / "broken.jpg").write_bytes(encoded(Image.fromarray(gradient()), "JPEG")[:300])
    Image.new("RGB", (1, 1)).save(odd / "dot.png")
    (odd / "notes.tif").write_bytes(b"II*\x00 this is not a TIFF")
    source = sources.FolderSource(str(root), align="detect", min_confidence=0.8, image_size=112)
    info, report = conversion.convert(source, str(tmp_path / "out"), split="train", num_shards=1, workers=1)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report.read == 12 and saved["read"] == 12
    assert saved["skipped"]["undecodable_image"] == 2 and saved["skipped"]["image_too_small"] == 1
    assert saved["detected"] == saved["written"] == info.num_images >= 2
    # Every canvas whose face MTCNN missed, and the empty wall, is a no_face; nothing is lost silently.
    assert saved["skipped"]["no_face"] == 8 - saved["detected"] + 1
    assert any("empty_wall" in example for example in saved["examples"]["no_face"])
    assert saved["written"] + sum(saved["skipped"].values()) == 12
    records = list(iterate_records(str(tmp_path / "out")))
    assert all(np.isfinite(r.yaw) for r in records)  # aligned by landmarks: yaw measured


def test_a_folder_of_pgm_faces_converts(tmp_path):
    root = tmp_path / "orl"
    for subject in range(1, 4):
        folder = root / f"s{subject}"
        folder.mkdir(parents=True)
        for shot in range(1, 4):
            face = synthetic.render_face(synthetic.make_identity(0, subject, 2), 0.0, 0, 0, 112,
                                         np.random.default_rng(shot))
            Image.fromarray(face).convert("L").resize((92, 112)).save(folder / f"{shot}.pgm")
    source = sources.FolderSource(str(root), align="none", image_size=112)
    info, report = conversion.convert(source, str(tmp_path / "out"), split="train", num_shards=1, workers=1)
    assert report.written == 9 and info.num_identities == 3 and not sum(report.skipped.values())
    record = next(iterate_records(str(tmp_path / "out")))
    decoded = images.decode_rgb(record.image)
    assert decoded.shape == (112, 112, 3) and np.all(decoded[..., 0] == decoded[..., 1])  # grey stays grey


def test_embed_writes_every_photo_or_says_why(tmp_path):
    model = str(tmp_path / "model.pt")
    shutil.copy(os.path.join(os.path.dirname(__file__), "data", "arcface_torch_small", "backbone.pt"), model)
    folder = tmp_path / "photos"
    folder.mkdir()
    for index, (canvas, _) in enumerate(faces_on_canvases(6)):
        Image.fromarray(canvas).save(folder / f"face{index}.png")
    Image.new("RGB", (300, 200), (110, 110, 110)).save(folder / "wall.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    output = tmp_path / "embeddings.npz"
    result = run_module(["-m", "mvcom_tf.embed", f"--model={model}", f"--images={folder}", f"--output={output}",
                         "--min_confidence=0.8"])
    assert result.returncode == 0, result.stderr[-2000:]
    saved = np.load(output)
    embedded = len(saved["paths"])
    assert embedded >= 2 and embedded + len(saved["no_face"]) + len(saved["unreadable"]) == 8
    assert any(p.endswith("wall.png") for p in saved["no_face"]) and "broken.jpg" in saved["unreadable"][0]
    assert f"{embedded} faces embedded" in result.stdout
    np.testing.assert_allclose(np.linalg.norm(saved["embeddings"], axis=1), 1.0, rtol=1e-5)
    # The same embedding from the saved landmarks, aligned and embedded here (flip-fused).
    embed, size = load_embedder(model)
    face = alignment.align_face(images.decode_rgb(open(saved["paths"][0], "rb").read()), saved["landmarks"][0], size)
    both = embed(face[None]).numpy() + embed(face[None, :, ::-1]).numpy()
    np.testing.assert_allclose(saved["embeddings"][0], both[0] / np.linalg.norm(both[0]), atol=1e-4)
    # --align=facenet: the same photos cropped as davidsandberg/facenet does (box + 32 px, resized square).
    facenet_output = tmp_path / "facenet.npz"
    facenet = run_module(["-m", "mvcom_tf.embed", f"--model={model}", f"--images={folder}",
                          f"--output={facenet_output}", "--min_confidence=0.8", "--align=facenet"])
    assert facenet.returncode == 0, facenet.stderr[-2000:]
    cropped = np.load(facenet_output)
    assert json.loads(str(cropped["align"])) == {"align": "facenet", "align_margin": 32.0}
    photo = images.decode_rgb(open(cropped["paths"][0], "rb").read())
    box = alignment.facenet_box(tuple(cropped["boxes"][0]), photo.shape, 32)
    face = alignment.warp_uint8(photo, alignment.crop_transform(box, size), size)
    both = embed(face[None]).numpy() + embed(face[None, :, ::-1]).numpy()
    np.testing.assert_allclose(cropped["embeddings"][0], both[0] / np.linalg.norm(both[0]), atol=1e-4)
    assert np.abs(cropped["embeddings"][0] - saved["embeddings"][0]).max() > 1e-3  # another crop, another embedding
    same = run_module(["-m", "mvcom_tf.embed", f"--model={model}", "--compare", "--threshold=0.5",
                       "--min_confidence=0.8", str(saved["paths"][0]), str(saved["paths"][0])])
    assert same.returncode == 0 and "cosine 1.0000: same person" in same.stdout, same.stderr[-2000:]
    wall = run_module(["-m", "mvcom_tf.embed", f"--model={model}", "--compare", "--threshold=0.5",
                       str(saved["paths"][0]), str(folder / "wall.png")])
    assert wall.returncode == 2 and "wall.png: no face found" in wall.stderr


def test_csv_kind_scores_like_the_pairs_kind_and_names_faceless_photos(tmp_path):
    from mvcom_tf.data.tfrecord import iterate_records
    from mvcom_tf.evaluation.run import evaluate
    from mvcom_tf.evaluation.verification import read_pairs

    model = os.path.join(os.path.dirname(__file__), "data", "arcface_torch_small", "backbone.pt")
    config = synthetic.SplitConfig(num_identities=8, image_size=112, seed=5)
    synthetic.write_split(str(tmp_path / "split"), "test", config, num_shards=1)
    records = list(iterate_records(str(tmp_path / "split")))
    lfw = tmp_path / "lfw"
    names = []
    for index, record in enumerate(records):
        name, number = f"person{record.identity}", index % 15 + 1
        (lfw / name).mkdir(parents=True, exist_ok=True)
        (lfw / name / f"{name}_{number:04d}.jpg").write_bytes(encoded(Image.open(io.BytesIO(record.image)), "JPEG"))
        names.append((name, number))
    pairs = read_pairs(str(tmp_path / "split" / "pairs.csv"))
    txt, rows = [], ["file_x,file_y,Decision"]
    for a, b, same in zip(pairs["index_a"], pairs["index_b"], pairs["same"]):
        (na, ka), (nb, kb) = names[a], names[b]
        txt.append(f"{na}\t{ka}\t{kb}" if same else f"{na}\t{ka}\t{nb}\t{kb}")
        rows.append(f"{na}/{na}_{ka:04d}.jpg,{nb}/{nb}_{kb:04d}.jpg,{'Yes' if same else 'No'}")
    (lfw / "pairs.txt").write_text("\n".join(txt) + "\n")
    (lfw / "pairs.csv").write_text("\n".join(rows) + "\n")
    by_pairs = evaluate(model, [f"pairs:{lfw}"], str(tmp_path / "e1"))["pairs:lfw"]
    by_csv = evaluate(model, [f"csv:{lfw / 'pairs.csv'}"], str(tmp_path / "e2"))["csv:pairs.csv"]
    assert by_csv["num_pairs"] == by_pairs["num_pairs"] == len(pairs["same"])
    assert by_csv["accuracy"] == by_pairs["accuracy"] and by_csv["no_face"] == by_pairs["no_face"] == 0
    # Aligned 112-px crops: --align=none takes them whole too (the same pixels), and results.json says which.
    from mvcom_tf.data.alignment import Placement
    whole = evaluate(model, [f"pairs:{lfw}"], str(tmp_path / "e0"), placement=Placement("none"))["pairs:lfw"]
    assert (whole["align"], by_pairs["align"]) == ("none", "arcface") and whole["accuracy"] == by_pairs["accuracy"]
    # Photos of another size are detected; one without a face is embedded whole, counted and named.
    photos = tmp_path / "photos"
    photos.mkdir()
    for index, (canvas, _) in enumerate(faces_on_canvases(3)):
        Image.fromarray(canvas).save(photos / f"face{index}.png")
    Image.new("RGB", (300, 200), (110, 110, 110)).save(photos / "wall.png")
    lines = ["face0.png,face0.png,1", "face1.png,wall.png,0", "face2.png,face1.png,0", "face1.png,face1.png,1",
             "face2.png,face2.png,1"] * 2  # ten pairs: the 10-fold protocol needs ten
    # An eleventh pair whose second photo is no image: left out of the figures, counted and named.
    (photos / "broken.jpg").write_bytes(b"not a photograph")
    lines.append("face0.png,broken.jpg,0")
    (photos / "list.csv").write_text("path1,path2,same\n" + "\n".join(lines) + "\n")
    result = evaluate(model, [f"csv:{photos / 'list.csv'}"], str(tmp_path / "e3"))["csv:list.csv"]
    assert result["num_pairs"] == 10 and str(photos / "wall.png") in result["no_face_images"]
    assert result["no_face"] == len(result["no_face_images"]) >= 1
    assert result["unreadable"] == 1 and result["pairs_left_out"] == 1
    assert "broken.jpg" in result["unreadable_images"][0] and "undecodable_image" in result["unreadable_images"][0]
