"""Output files of the runtime: which files at an output path are ours, and what is never opened."""

import os

from PIL import Image, PngImagePlugin

from deleaker.runtime.images import RECORD_KEY, carries_record, read_png_record, save_pngs_atomic, special_file_kind
from deleaker.staging import staged_name


def test_a_png_of_ours_carries_its_record_even_cut_short(tmp_path):
    ours = tmp_path / "ours.png"
    save_pngs_atomic([(Image.new("RGB", (16, 16), "blue"), ours)], {"prompt": "a cat and a dog", "seed": 1})
    assert carries_record(ours) and read_png_record(ours) == (True, {"prompt": "a cat and a dog", "seed": 1})
    data = ours.read_bytes()
    ours.write_bytes(data[:100])  # cut inside the record chunk: still recognisably ours, no longer complete
    assert carries_record(ours) and read_png_record(ours) == (False, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.png"]  # no staging file left behind


def test_files_of_others_do_not_carry_our_record(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    other = tmp_path / "other.png"
    info = PngImagePlugin.PngInfo()
    info.add_itxt("comment", RECORD_KEY)  # our key as a value, under another keyword
    Image.new("RGB", (8, 8)).save(other, pnginfo=info)
    jpeg = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    text = tmp_path / "lines.png"
    text.write_text('{"prompt": "a cat and a dog", "entities": ["cat", "dog"]}\n')
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert not any(carries_record(p) for p in (plain, other, jpeg, text, empty, tmp_path / "missing.png"))


def test_special_files_are_named_and_never_opened(tmp_path):
    fifo = tmp_path / "f.png"
    os.mkfifo(fifo)
    link = tmp_path / "l.png"
    link.symlink_to(tmp_path / "nowhere.png")
    assert special_file_kind(fifo) == "a FIFO" and special_file_kind(link) == "a symbolic link"
    assert special_file_kind(tmp_path) == "a directory" and special_file_kind(tmp_path / "none.png") is None
    # Opening a FIFO for reading blocks until a writer comes: these return at once.
    assert not carries_record(fifo) and read_png_record(fifo) == (False, None)


def test_images_are_staged_under_a_name_of_ours(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append(os.path.basename(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    save_pngs_atomic([(Image.new("RGB", (8, 8)), tmp_path / "a.png")])
    assert [staged_name(name) for name in seen] == ["a.png"]
