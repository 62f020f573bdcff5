"""The loader benchmark makes its files with the project's tools, times the datamodules' loaders and
writes where its numbers came from (timings are not checked: speed is the benchmark's job)."""

from __future__ import annotations

import json

from scripts.bench import loaders


def test_the_loader_benchmark_times_both_loaders_on_files_of_the_project_tools_and_records_its_provenance(
    tmp_path,
):
    output = tmp_path / "result.json"
    loaders.main([
        "--batch-size", "4", "--warmup", "1", "--batches", "2", "--repeats", "1", "--workers", "0", "1",
        "--resolution", "32", "--data-dir", str(tmp_path / "data"), "--output", str(output),
    ])  # fmt: skip
    result = json.loads(output.read_text())
    provenance = result["provenance"]
    recorded = {"command", "commit", "uncommitted_changes", "tree", "cpu_model", "cpu_cores", "gpu", "torch"}
    assert recorded <= set(provenance)
    assert provenance["command"].startswith("python ")
    assert result["files"]["source_images"] == result["data"]["images"] == 12  # (1 + 2) batches of 4
    assert result["files"]["cache_vae"]["name"] == "f16d32"
    assert result["data"]["latent_shape"] == [64, 2, 2]  # [mean; std] of f16d32 at 32 px
    for name in loaders.LOADERS:
        entry = result["loaders"][name]
        assert set(entry["workers"]) == {"0", "1"}
        for workers, timing in entry["workers"].items():
            assert timing["images_per_second"] > 0
            assert timing["images_per_second_per_process"] == timing["images_per_second"] / max(
                int(workers), 1
            )
            assert timing["runs"][0]["batch"]["image"] == [[4, 3, 32, 32], "torch.uint8"]
        assert {"h5_read", "png_decode", "getitem", "collate"} <= set(entry["per_sample_ms"]["threads_1"])
    assert result["loaders"]["cached_latents"]["workers"]["1"]["runs"][0]["batch"]["latent"] == [
        [4, 64, 2, 2],
        "torch.float32",
    ]
