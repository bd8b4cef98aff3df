"""Sources named by the config, end to end: tar shards with bad samples train on, skips are counted in the
metrics, and too many bad samples stop the run with a clear message; mixtures and spec errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from configs import clip
from jclip.data import configured, robust
from jclip_testing import REPO_ROOT, micro_run_flags

# Bad samples of each shard, by the reason they must be counted under.
BAD_PER_SHARD = {"undecodable_image": 2, "truncated_image": 1, "missing_caption": 1, "empty_caption": 1, "undecodable_caption": 1}
GOOD_PER_SHARD = 34


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_shards(directory, shards: int = 2) -> str:
    for shard in range(shards):
        samples = [(jpeg(shard * 1000 + i), f"photo {i} of shard {shard}".encode()) for i in range(GOOD_PER_SHARD)]
        good = jpeg(shard)
        samples += [(b"this is not an image", b"undecodable")] * BAD_PER_SHARD["undecodable_image"]
        samples += [(good[: len(good) // 3], b"truncated")] * BAD_PER_SHARD["truncated_image"]
        samples += [(good, None)] * BAD_PER_SHARD["missing_caption"]
        samples += [(good, b"   ")] * BAD_PER_SHARD["empty_caption"]
        samples += [(good, b"\xff\xfe\xfa bad utf-8")] * BAD_PER_SHARD["undecodable_caption"]
        with tarfile.open(directory / f"{shard:05d}.tar", "w") as archive:
            for index, (image, caption) in enumerate(samples):
                key = f"{shard:05d}{index:04d}"
                add(archive, f"{key}.jpg", image)
                if caption is not None:
                    add(archive, f"{key}.txt", caption)
                add(archive, f"{key}.json", json.dumps({"key": key}).encode())
    return f"wds:{directory}/{{00000..{shards - 1:05d}}}.tar"


def run_main(workdir, flags):
    return subprocess.run(
        [sys.executable, "-m", "jclip.main", "--config=configs/clip.py", f"--workdir={workdir}", *flags],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )


def skip_totals(workdir) -> dict[str, float]:
    last = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if "data/skip_rate" in line][-1]
    return {key.split("/")[-1]: value for key, value in last.items() if key.startswith("data/skipped/")}


def test_tar_shards_with_bad_samples_train_and_count_then_stop_past_the_threshold(tmp_path, scenes_data_dir):
    spec = write_shards(tmp_path)
    per_epoch = 2 * GOOD_PER_SHARD  # good examples in one pass over both shards
    steps = 10  # 160 good examples: more than two whole epochs
    flags = micro_run_flags(
        scenes_data_dir, total_steps=steps, checkpoint_every=100, **{"data.skip_check_after": 50}
    ) + [
        f"--config.data.source={spec}", "--config.data.shuffle_buffer=16", "--config.data.max_skip_rate=0.5",
        "--config.evals.retrieval.source=embedded", "--config.evals.zeroshot.source=embedded",
        "--config.evals.compositional.source=embedded",
    ]
    result = run_main(tmp_path / "run", flags)
    assert result.returncode == 0, result.stderr[-4000:]
    totals = skip_totals(tmp_path / "run")
    completed_epochs = steps * 16 // per_epoch
    for reason, per_shard in BAD_PER_SHARD.items():
        # Every pass over the shards meets each bad sample once; a skip is counted with the next good row,
        # so the passes wholly consumed are counted for sure and the current one at most.
        assert completed_epochs * 2 * per_shard <= totals[reason] <= (completed_epochs + 1) * 2 * per_shard, (reason, totals)
    assert sum(totals.values()) == sum(totals[r] for r in BAD_PER_SHARD), totals

    result = run_main(tmp_path / "strict", flags + ["--config.data.max_skip_rate=0.05"])
    assert result.returncode == 3, result.stderr[-4000:]
    assert "were skipped as bad" in result.stderr and "data.max_skip_rate" in result.stderr
    assert "undecodable_image" in result.stderr and "Traceback" not in result.stderr


def test_missing_shards_and_datasets_fail_at_start_up(tmp_path):
    result = run_main(tmp_path / "run", [f"--config.data.source=wds:{tmp_path}/{{00000..00003}}.tar"])
    assert result.returncode != 0 and "00000.tar" in result.stderr
    result = run_main(tmp_path / "run2", ["--config.data.source=tfds:not_a_dataset_name", f"--config.data.data_dir={tmp_path}"])
    assert result.returncode != 0 and "not_a_dataset_name" in result.stderr


def test_specs_and_mixture_validation():
    assert configured.SourceSpec.parse("tfds:coco_captions/2017") == configured.SourceSpec("tfds", "coco_captions/2017")
    assert configured.SourceSpec.parse("embedded") == configured.SourceSpec("embedded", None)
    with pytest.raises(ValueError, match="unknown data source"):
        configured.SourceSpec.parse("s3:bucket")
    with pytest.raises(ValueError, match="needs an argument"):
        configured.SourceSpec.parse("wds")
    config = clip.get_config()
    config.data.mixture = {"a": {"source": "embedded", "weight": 0.0}}
    with pytest.raises(ValueError, match="weight must be positive"):
        configured.validate_data_config(config.data)


def test_mixture_of_embedded_and_tar_shards_yields_both(tmp_path, scenes_data_dir):
    spec = write_shards(tmp_path)
    config = clip.get_config()
    config.data.embedded_config = "small"
    config.data.data_dir = str(scenes_data_dir)
    config.data.batch_size = 16
    config.data.num_threads = 1
    config.data.shuffle_buffer = 8
    config.data.mixture = {"scenes": {"source": "embedded", "weight": 1.0}, "web": {"source": spec, "weight": 1.0}}
    data = configured.ConfiguredData(config.data, config.model)
    from jclip.data.pipeline import HostShard

    iterator = iter(data.training_dataset(seed=0, shard=HostShard(0, 1)))
    counter = robust.SkipCounter(min_examples=1)
    batches = [counter.update(next(iterator)) for _ in range(8)]
    tokens = np.concatenate([b["token_ids"] for b in batches])
    from jclip.data.tokenizer import ClipTokenizer

    texts = [ClipTokenizer(config.model.text.context_length).decode(row) for row in tokens]
    from_web = np.mean(["shard" in text for text in texts])
    assert 0.3 < from_web < 0.7, from_web
    assert counter.skipped > 0 and batches[0]["images"].shape == (16, 32, 32, 3)


@pytest.mark.slow
def test_a_mixture_with_tar_shards_resumes_to_the_exact_batch(tmp_path, scenes_data_dir):
    """Restart from an early checkpoint of a finished run: the later steps' losses must come out identical,
    which needs the mixture's, the tar stream's and the skip counters' states all restored exactly."""
    import shutil

    from jclip_testing import read_losses

    spec = write_shards(tmp_path)
    flags = micro_run_flags(scenes_data_dir, total_steps=12, checkpoint_every=4, keep_checkpoints=5) + [
        "--config.data.shuffle_buffer=16", "--config.data.max_skip_rate=0.5",
    ]
    # New mixture entries cannot be added by --config flags: a config file of the test's own sets them.
    config_file = tmp_path / "mixture_config.py"
    config_file.write_text(
        "from configs import clip\n\n\ndef get_config(arg=None):\n    config = clip.get_config(arg)\n"
        f"    config.data.mixture = {{'scenes': {{'source': 'embedded', 'weight': 1.0}}, 'web': {{'source': {spec!r}, 'weight': 1.0}}}}\n"
        "    return config\n"
    )

    def run(workdir):
        result = subprocess.run(
            [sys.executable, "-m", "jclip.main", f"--config={config_file}", f"--workdir={workdir}", *flags],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        return result

    full = tmp_path / "full"
    run(full)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "4", resumed / "checkpoints" / "4")
    result = run(resumed)
    assert "at step 4" in result.stdout
    expected, got = read_losses(full), read_losses(resumed)
    assert sorted(got) == list(range(5, 13))
    np.testing.assert_array_equal([got[s] for s in range(5, 13)], [expected[s] for s in range(5, 13)])
    assert skip_totals(resumed) == skip_totals(full), "the skip counters must resume too"


# ----- split slicing, captions from labels, field overrides, DOCCI -------------------------------------------

# Class folders whose images are solid red, green or blue, so that a batch row's class shows in its pixels.
CLASS_COLOURS = {"ant": (255, 0, 0), "maple_tree": (0, 255, 0), "sea_lion": (0, 0, 255)}
PER_CLASS = 4


def write_class_folders(root) -> str:
    for name, colour in CLASS_COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(root / name / f"{i}.png")
    return f"classfolders:{root}"


def data_config(source: str, **fields):
    config = clip.get_config()
    config.data.source = source
    config.data.batch_size = 8
    config.data.num_threads = 1
    for key, value in fields.items():
        config.data[key] = value
    return config


def test_class_folder_splits_are_permuted_disjoint_slices(tmp_path):
    config = data_config(write_class_folders(tmp_path))
    data = configured.ConfiguredData(config.data, config.model)
    keys = lambda source: [source[i]["key"] for i in range(len(source))]  # noqa: E731
    everything = keys(data.source("validation"))  # a split name alone selects the whole folder
    assert sorted(everything) == sorted(f"{c}/{i}.png" for c in CLASS_COLOURS for i in range(PER_CLASS))
    head, tail = keys(data.source("train[:75%]")), keys(data.source("train[75%:]"))
    assert (len(head), len(tail)) == (9, 3)
    assert set(head).isdisjoint(tail) and sorted(head + tail) == sorted(everything)
    assert tail != everything[-3:], "the tail is drawn from a permutation, not the class-sorted order"
    assert data.class_names("train[75%:]") == list(CLASS_COLOURS)
    with pytest.raises(ValueError, match=r"'train\[:x\]'.*accepted forms"):
        data.source("train[:x]")


def test_caption_templates_caption_training_batches_from_class_names(tmp_path):
    from jclip.data.pipeline import HostShard
    from jclip.data.tokenizer import ClipTokenizer

    templates = ("a photo of a {}.", "a blurry photo of a {}.")
    config = data_config(write_class_folders(tmp_path), caption_templates=templates)
    data = configured.ConfiguredData(config.data, config.model)
    data.prepare(set())
    tokenizer = ClipTokenizer(config.model.text.context_length)
    expected = {  # by the colour channel that is high
        0: ["a photo of a ant.", "a blurry photo of a ant."],
        1: ["a photo of a maple tree.", "a blurry photo of a maple tree."],
        2: ["a photo of a sea lion.", "a blurry photo of a sea lion."],
    }
    iterator = iter(data.training_dataset(seed=0, shard=HostShard(0, 1)))
    seen = set()
    for _ in range(3):
        batch = next(iterator)
        for image, tokens in zip(batch["images"], batch["token_ids"]):
            channel = int(np.argmax(image.mean(axis=(0, 1))))
            matches = [text for text in expected[channel] if np.array_equal(tokens, tokenizer(text))]
            assert len(matches) == 1, (channel, tokenizer.decode(tokens))
            seen.add(matches[0].split(" a ")[0])
    assert seen == {"a photo of", "a blurry photo of"}, "each visit samples one of the templates"


def test_caption_templates_need_labelled_training_sources(tmp_path):
    (tmp_path / "captions.jsonl").write_text(json.dumps({"path": "a.png", "caption": "x"}) + "\n")
    config = data_config(f"folder:{tmp_path}/captions.jsonl", caption_templates=("a photo of a {}.",))
    data = configured.ConfiguredData(config.data, config.model)
    with pytest.raises(ValueError, match=r"training source 'folder:.*captions.jsonl' \(data.source\) has no class names"):
        data.prepare(set())
    config = data_config(f"wds:{tmp_path}/{{00000..00001}}.tar", caption_templates=("a photo of a {}.",))
    with pytest.raises(ValueError, match=r"'wds:.*' \(data.source\) has no class names"):
        configured.ConfiguredData(config.data, config.model).prepare(set())
    config = data_config("embedded", caption_templates=("a photo of a {} {}.",))
    with pytest.raises(ValueError, match="exactly one"):
        configured.ConfiguredData(config.data, config.model)


def test_field_overrides_and_extra_fields_per_source(scenes_data_dir):
    from jclip.data.sources import embedded

    config = data_config("embedded", embedded_config="small", data_dir=str(scenes_data_dir))
    data = configured.ConfiguredData(config.data, config.model)
    probes = data.source("validation", caption_field="probe_caption",
                         extra_fields=(("negative_captions", "negative_captions"),))
    plain = data.source("validation")
    reference = embedded.load_source("validation", data_dir=str(scenes_data_dir), config="small")
    for i in (0, 7):
        example = probes[i]
        assert example["caption"] == reference[i]["probe_caption"].decode("utf-8")
        negatives = example["negative_captions"]
        assert isinstance(negatives, list) and len(negatives) == 3 and all(isinstance(n, str) for n in negatives)
        assert example["caption"] not in negatives
        assert plain[i]["caption"] == reference[i]["caption"].decode("utf-8") and "negative_captions" not in plain[i]
    assert data.source("validation", caption_field="probe_caption",
                       extra_fields=(("negative_captions", "negative_captions"),)) is probes, "cached"
    with pytest.raises(ValueError, match="extra_fields .* need a TFDS source"):
        data.source("validation", "classfolders:/nowhere", extra_fields=(("x", "y"),))


def test_docci_through_the_config(tmp_path):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / "test_00002.png")
    entries = [{"example_id": f"{split}_{i:05d}", "split": split, "image_file": f"{split}_{i:05d}.png",
                "description": f"{split} description {i}"} for split in ("train", "test") for i in (1, 2, 3)]
    (tmp_path / "docci_descriptions.jsonlines").write_text("".join(json.dumps(e) + "\n" for e in entries))
    config = data_config("embedded")
    data = configured.ConfiguredData(config.data, config.model)
    source = data.source("test[1:]", f"docci:{tmp_path}/docci_descriptions.jsonlines")
    assert [source[i]["caption"] for i in range(len(source))] == ["test description 2", "test description 3"]
    assert source[0]["image"] == (tmp_path / "images" / "test_00002.png").read_bytes() and source[1]["image"] is None
    assert configured.SourceSpec.parse("docci:/x.jsonlines") == configured.SourceSpec("docci", "/x.jsonlines")


# ----- improved captions: caption_rule and recaptions shorthands, per mixture entry, extra_fields ---------------

def test_caption_rule_and_recaptions_shorthands_place_their_ops(tmp_path):
    from jclip.data import recaptions

    default_tail = "choose_caption|decode_image|crop_image|normalise_image|tokenize(field='caption', out='token_ids')"
    plain = configured.ConfiguredData(data_config("embedded").data, clip.get_config().model)
    config = data_config("embedded", caption_rule="mixed:0.5")
    data = configured.ConfiguredData(config.data, config.model)
    assert data.preprocess_spec() == "caption_rule(rule='mixed:0.5')|" + default_tail
    assert data.batch_fields() == plain.batch_fields(), "the rule changes what is tokenized, not the batch"

    store = str(recaptions.write_recaptions(tmp_path / "dense", {"k": "A caption."}))
    config = data_config("embedded", caption_rule="alternate", recaptions=store)
    assert configured.ConfiguredData(config.data, config.model).preprocess_spec() == (
        f"joined_captions(dir={store!r})|caption_rule(rule='alternate')|" + default_tail)
    other = str(recaptions.write_recaptions(tmp_path / "long", {"k": "A caption."}, field="long_caption"))
    config = data_config("embedded", caption_rule="dense", recaptions=other)
    assert configured.ConfiguredData(config.data, config.model).preprocess_spec() == (
        f"joined_captions(dir={other!r}, field='long_caption')|caption_rule(rule='dense', dense_field='long_caption')|"
        + default_tail)
    own = "decode_image|caption_rule(rule='short')|tokenize(field='caption', out='token_ids')"
    config = data_config("embedded", preprocess=own, recaptions=store)
    assert configured.ConfiguredData(config.data, config.model).preprocess_spec() == (
        f"decode_image|joined_captions(dir={store!r})|caption_rule(rule='short')|tokenize(field='caption', out='token_ids')")

    for fields, message in [
        ({"recaptions": store}, r"joins recaptions into 'dense_caption', but no op of the preprocessing reads it"),
        ({"caption_rule": "dense", "preprocess": own}, "has its own caption_rule op: keep one"),
        ({"caption_rule": "often"}, r"data.caption_rule: caption rule 'often'"),
        ({"caption_rule": "dense", "recaptions": str(tmp_path / "absent")},
         r"data.recaptions: recaptions: no folder .*absent; make it with python -m jclip.join_captions"),
        ({"mixture": {"a": {"source": "embedded", "caption_rule": "mixed:2"}}}, r"data.mixture.a.caption_rule"),
    ]:
        config = data_config("embedded", **fields)
        with pytest.raises(ValueError, match=message):
            configured.ConfiguredData(config.data, config.model)


def captioned(source, count, offset=0):
    """(dense captions, short captions) of examples offset..offset+count-1 of the small embedded train split."""
    examples = [source[i] for i in range(offset, offset + count)]
    return ([e["dense_caption"].decode("utf-8") for e in examples], [e["caption"].decode("utf-8") for e in examples])


def test_each_mixture_entry_has_its_own_caption_rule_over_extra_fields(scenes_data_dir):
    """Two slices of the embedded set: one trains on dense captions (from `extra_fields`), one on alt-text."""
    from jclip.data.pipeline import HostShard
    from jclip.data.sources import embedded
    from jclip.data.tokenizer import make_tokenizer

    config = data_config("embedded", embedded_config="small", data_dir=str(scenes_data_dir), batch_size=16,
                         caption_rule="dense", extra_fields=(("dense_caption", "dense_caption"),))
    config.data.mixture = {"long": {"source": "embedded", "train_split": "train[:32]"},
                           "short": {"source": "embedded", "train_split": "train[32:64]", "caption_rule": "short"}}
    data = configured.ConfiguredData(config.data, config.model)
    assert [len(ops) for ops in data.component_ops()] == [6, 6]
    assert data.preprocess_spec(config.data.mixture["short"]).startswith("caption_rule(rule='short')|")
    tokenizer = make_tokenizer(data.tokenizer_spec, data.context_length)
    reference = embedded.load_source("train", data_dir=str(scenes_data_dir), config="small")
    dense_first, _ = captioned(reference, 32)
    _, short_second = captioned(reference, 32, offset=32)
    dense_rows = {tokenizer(text).tobytes() for text in dense_first}
    short_rows = {tokenizer(text).tobytes() for text in short_second}
    iterator = iter(data.training_dataset(seed=0, shard=HostShard(0, 1)))
    rows = [row.tobytes() for _ in range(6) for row in next(iterator)["token_ids"]]
    assert all(row in dense_rows or row in short_rows for row in rows)
    from_long = sum(row in dense_rows for row in rows)
    assert 0.3 < from_long / len(rows) < 0.7, from_long


def test_alternate_switches_captions_each_epoch_of_the_source(scenes_data_dir):
    from jclip.data.pipeline import HostShard
    from jclip.data.sources import embedded
    from jclip.data.tokenizer import make_tokenizer

    config = data_config("embedded", embedded_config="small", data_dir=str(scenes_data_dir), batch_size=16,
                         train_split="train[:32]", caption_rule="alternate",
                         extra_fields=(("dense_caption", "dense_caption"),))
    data = configured.ConfiguredData(config.data, config.model)
    tokenizer = make_tokenizer(data.tokenizer_spec, data.context_length)
    dense, short = captioned(embedded.load_source("train", data_dir=str(scenes_data_dir), config="small"), 32)
    iterator = iter(data.training_dataset(seed=0, shard=HostShard(0, 1)))
    for epoch in range(3):  # two batches of 16 per epoch of 32
        rows = {row.tobytes() for _ in range(2) for row in next(iterator)["token_ids"]}
        texts = dense if epoch % 2 == 0 else short
        assert rows == {tokenizer(text).tobytes() for text in texts}, epoch


# ----- decoding and worker processes: data.jpeg_draft, data.num_workers=auto ----------------------------------

def test_embedded_batches_are_bit_identical_with_and_without_jpeg_draft(scenes_data_dir):
    """The quick start's data: 64 px scenes decoded by TFDS to arrays (stored as PNG), cropped to 32 px. Draft
    mode only touches JPEG bytes at least twice the crop, so the batches (and the README's metrics) stay."""
    from jclip.data import pipeline

    batches = {}
    for draft in (False, True):
        config = data_config("embedded", embedded_config="small", data_dir=str(scenes_data_dir), jpeg_draft=draft)
        config.data.batch_size = 8
        data = configured.ConfiguredData(config.data, config.model)
        assert data.op_context.jpeg_draft is draft and data.image_size == 32
        iterator = iter(data.training_dataset(seed=0, shard=pipeline.HostShard(0, 1)))
        batches[draft] = [next(iterator) for _ in range(2)]
    for exact, drafted in zip(batches[False], batches[True]):
        assert exact["images"].shape == (8, 32, 32, 3)
        for field in exact:
            np.testing.assert_array_equal(exact[field], drafted[field])


def test_auto_workers_take_the_hosts_cores_less_two_within_memory_and_shards(tmp_path, monkeypatch):
    from jclip.data import pipeline

    monkeypatch.setattr(pipeline, "usable_cores", lambda: 240)  # a TPU VM host
    monkeypatch.setattr(pipeline, "host_memory_bytes", lambda: 64 * 2**30)
    config = data_config("embedded", num_workers=-1)
    config.data.batch_size = 512
    data = configured.ConfiguredData(config.data, config.model)
    assert data.num_workers(pipeline.HostShard(0, 4)) == 238  # 128 rows of 32 px: memory is no limit
    config.model.vision.image_size = 224  # 512 rows of 224 px in float32: 2 batches a worker in half of 64 GiB
    assert configured.ConfiguredData(config.data, config.model).num_workers(pipeline.HostShard(0, 1)) == (
        32 * 2**30 // (2 * 512 * 224 * 224 * 3 * 4)) == 55
    for index in range(10):
        (tmp_path / f"{index}.tar").write_bytes(b"")
    config = data_config(f"wds:{tmp_path}/{{0..9}}.tar", num_workers=-1)
    data = configured.ConfiguredData(config.data, config.model)
    assert data.num_workers(pipeline.HostShard(0, 2)) == 5  # each worker needs a shard of its own
    config.data.num_workers = 300  # an explicit count is taken as given
    assert configured.ConfiguredData(config.data, config.model).num_workers(pipeline.HostShard(0, 2)) == 300
