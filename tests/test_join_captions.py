"""`python -m jclip.join_captions`: a captioner's JSONL joined by key onto the config's training data (the
embedded dataset, tar shards), the report's counts, malformed input refused with its line, and training
reading the joined recaptions through `data.recaptions` and `data.caption_rule`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from configs import clip
from jclip import join_captions
from jclip.data import recaptions, robust
from jclip.data.pipeline import HostShard
from jclip_testing import REPO_ROOT, embedded_data_config

SMALL_TRAIN = 2000  # examples in the small embedded dataset's train split


def key(index: int) -> str:
    return f"jclip_scenes/small:train:{index}"


def write_jsonl(path, records, blank_lines=0):
    lines = [json.dumps(record) if not isinstance(record, str) else record for record in records]
    path.write_text("\n".join(lines + [""] * blank_lines) + "\n")
    return path


@pytest.fixture(scope="module")
def dense_captions(scenes_data_dir):
    from jclip.data.sources import embedded

    source = embedded.load_source("train", data_dir=str(scenes_data_dir), config="small")
    return [source[i]["dense_caption"].decode("utf-8") for i in range(SMALL_TRAIN)]


def test_joins_by_key_and_reports_what_did_not_join(tmp_path, scenes_data_dir, dense_captions):
    records = [{"key": key(i), "caption": f"recaption {i}. {dense_captions[i]}", "model": "any"} for i in range(1500)]
    strangers = [key(5000), "000010123", "jclip_scenes/small:validation:0"]
    records[700:700] = [{"key": stranger, "caption": "not in the data"} for stranger in strangers]
    captions = write_jsonl(tmp_path / "recaps.jsonl", records, blank_lines=2)
    lines = []
    report = join_captions.join_captions(embedded_data_config(scenes_data_dir), captions, tmp_path / "out", log=lines.append)

    assert report["lines"] == 1503 + 2 and report["blank_lines"] == 2 and report["captions"] == 1503
    assert report["examples"] == SMALL_TRAIN and report["examples_per_component"] == {"main": SMALL_TRAIN}
    assert report["joined"] == 1500
    assert report["not_in_source"] == 3 and report["not_in_source_first"] == strangers
    assert report["without_recaption"] == 500
    assert report["without_recaption_first"] == [key(i) for i in range(1500, 1505)]
    assert any("main: 2000 examples" in line for line in lines)

    store = recaptions.Recaptions(tmp_path / "out")
    assert len(store) == 1500 and store.field == "dense_caption"
    assert store.caption(key(0)) == f"recaption 0. {dense_captions[0]}"
    assert store.caption(key(1499)).startswith("recaption 1499. ")
    assert store.caption(key(1500)) is None and store.caption(strangers[0]) is None
    assert store.meta["report"]["joined"] == 1500 and store.meta["source"]["source"] == "embedded"

    printed = join_captions.summary_lines(report)
    assert f"keys in the captions file not in the data: 3 (first: {', '.join(map(repr, strangers))})" in printed
    assert any(line.startswith("examples without a recaption: 500 (first: 'jclip_scenes/small:train:1500'")
               for line in printed)


def test_training_reads_the_joined_recaptions_and_counts_the_examples_without(tmp_path, scenes_data_dir, dense_captions):
    from jclip.data import configured
    from jclip.data.tokenizer import make_tokenizer

    records = [{"key": key(i), "caption": dense_captions[i]} for i in range(0, SMALL_TRAIN, 4) if i % 8]  # 250 of 2000
    join_captions.join_captions(embedded_data_config(scenes_data_dir), write_jsonl(tmp_path / "r.jsonl", records),
                                tmp_path / "recaps", log=lambda line: None)
    config = embedded_data_config(scenes_data_dir, recaptions=str(tmp_path / "recaps"), caption_rule="dense")
    data = configured.ConfiguredData(config.data, config.model)
    assert data.preprocess_spec().startswith(f"joined_captions(dir={str(tmp_path / 'recaps')!r})|caption_rule(rule='dense')|choose_caption")
    data.prepare(set())
    tokenizer = make_tokenizer(data.tokenizer_spec, data.context_length)
    joined = {tokenizer(record["caption"]).tobytes() for record in records}
    iterator = iter(data.training_dataset(seed=0, shard=HostShard(0, 1)))
    batches = [next(iterator) for _ in range(4)]
    rows = [row.tobytes() for batch in batches for row in batch["token_ids"]]
    assert all(row in joined for row in rows), "every trained text is a joined recaption"
    skipped = robust.skip_totals(batches)
    assert skipped["missing_recaption"] > 5 * len(rows), "7 of 8 examples have none and are skipped, counted"
    assert sum(skipped.values()) == skipped["missing_recaption"]


def test_malformed_lines_and_repeated_keys_are_errors_naming_the_line(tmp_path, scenes_data_dir):
    config = embedded_data_config(scenes_data_dir)
    good = {"key": key(0), "caption": "fine"}
    cases = [
        ([good, "{not json"], r"line 2 is not JSON"),
        ([good, '["a", "b"]'], r"line 2 is not a JSON object"),
        ([good, {"caption": "no key"}], r"line 2 has no 'key'"),
        ([good, {"key": 17, "caption": "x"}], r"line 2 has a int 'key' \(17\)"),
        ([good, {"key": key(1), "caption": "   "}], r"line 2 has a blank 'caption'"),
        ([good, {"key": key(1)}], r"line 2 has no 'caption'"),
        ([good, {"key": key(1), "caption": "a"}, {"key": key(0), "caption": "again"}],
         r"line 3: key 'jclip_scenes/small:train:0' was already given on line 1"),
    ]
    for records, message in cases:
        path = write_jsonl(tmp_path / "bad.jsonl", records)
        with pytest.raises(join_captions.CaptionsFileError, match=message):
            join_captions.join_captions(config, path, tmp_path / "out", log=lambda line: None)
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(good).encode() + b'\n{"key": "\xe9"}\n')
    with pytest.raises(join_captions.CaptionsFileError, match="line 2 is not UTF-8"):
        join_captions.read_captions(tmp_path / "latin1.jsonl")
    assert not (tmp_path / "out").exists(), "nothing is written from a bad file"

    unrelated = write_jsonl(tmp_path / "other.jsonl", [{"key": f"{i:09d}", "caption": "x"} for i in range(3)])
    with pytest.raises(ValueError, match=r"no key of .* the file's keys look like \['000000000'.* the data's like "
                                         r"\['jclip_scenes/small:train:0'"):
        join_captions.join_captions(config, unrelated, tmp_path / "out", log=lambda line: None)


# ----- tar shards (img2dataset output): keys from the tar headers, images untouched --------------------------

def png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(directory, shards=2, per_shard=20) -> str:
    image = png()
    for shard in range(shards):
        with tarfile.open(directory / f"{shard:05d}.tar", "w") as archive:
            for index in range(per_shard):
                sample = f"{shard:05d}{index:04d}"
                for extension, data in (("jpg", image), ("txt", f"alt {sample}".encode())):
                    info = tarfile.TarInfo(f"{sample}.{extension}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return f"wds:{directory}/{{00000..{shards - 1:05d}}}.tar"


def test_recaptions_join_onto_tar_shards_and_train(tmp_path):
    from jclip.data import configured
    from jclip.data.tokenizer import make_tokenizer

    (tmp_path / "shards").mkdir()
    spec = write_shards(tmp_path / "shards")
    before = {path.name: path.read_bytes() for path in (tmp_path / "shards").iterdir()}
    config = clip.get_config()
    config.data.source, config.data.batch_size, config.data.num_threads, config.data.shuffle_buffer = spec, 8, 1, 8
    records = [{"key": f"{shard:05d}{index:04d}", "caption": f"A dense recaption of sample {shard} {index}."}
               for shard in range(2) for index in range(20) if (shard, index) != (1, 7)]
    report = join_captions.join_captions(config, write_jsonl(tmp_path / "r.jsonl", records), tmp_path / "recaps",
                                         log=lambda line: None)
    assert (report["examples"], report["joined"], report["not_in_source"]) == (40, 39, 0)
    assert report["without_recaption_first"] == ["000010007"]
    assert {path.name: path.read_bytes() for path in (tmp_path / "shards").iterdir()} == before, "shards untouched"

    config.data.recaptions, config.data.caption_rule = str(tmp_path / "recaps"), "mixed:0.5"
    data = configured.ConfiguredData(config.data, config.model)
    data.prepare(set())
    tokenizer = make_tokenizer(data.tokenizer_spec, data.context_length)
    iterator = iter(data.training_dataset(seed=0, shard=HostShard(0, 1)))
    texts = [tokenizer.decode(row) for _ in range(10) for row in next(iterator)["token_ids"]]
    dense = sum("dense recaption" in text for text in texts)
    assert sum(text.startswith("alt ") for text in texts) + dense == len(texts) == 80
    assert 20 < dense < 60, dense


# ----- the command ----------------------------------------------------------------------------------------------

def test_the_command_prints_the_report_and_refuses_missing_flags(tmp_path, scenes_data_dir):
    captions = write_jsonl(tmp_path / "r.jsonl", [{"key": key(i), "caption": f"dense {i}."} for i in range(10)]
                           + [{"key": "nowhere", "caption": "x"}])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    command = [sys.executable, "-m", "jclip.join_captions", "--config=configs/clip.py", f"--captions={captions}",
               f"--output={tmp_path / 'out'}", "--config.data.embedded_config=small",
               f"--config.data.data_dir={scenes_data_dir}", "--config.data.caption_rule=dense",
               f"--config.data.recaptions={tmp_path / 'out'}"]  # the training config names the folder still to be made
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert f"captions file: {captions}: 11 lines, 11 captions" in out
    assert "training examples: 2000 (main 2000)" in out and "joined: 10 recaptions" in out
    assert "keys in the captions file not in the data: 1 (first: 'nowhere')" in out
    assert "examples without a recaption: 1990 (first: 'jclip_scenes/small:train:10'" in out
    assert f"recaptions written to {tmp_path / 'out'} (field dense_caption)" in out
    assert recaptions.Recaptions(tmp_path / "out").caption(key(3)) == "dense 3."

    missing = subprocess.run(command[:5] + command[6:], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
    assert missing.returncode != 0 and "--output is required" in missing.stderr
    write_jsonl(captions, [{"key": key(0), "caption": "x"}, "oops"])
    bad = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "line 2 is not JSON" in bad.stderr
