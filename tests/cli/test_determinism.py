"""Same source, data, seed and device (CPU): the same checkpoint bytes and the same
`measure --json`, run after run, in one process (the global RNG moves between runs)."""

from __future__ import annotations

import json

from safetensors.torch import save_file

from tests.cli.helpers import ARCH, TINY, invoke


def _without_timings(text: str) -> dict:
    """The report less what measures the run rather than the result (times, peak memory)."""
    data = json.loads(text)
    data.pop("timings")
    assert data.pop("resources")["device"] == "cpu"
    return data


def test_rescale_twice_gives_the_same_bytes(tmp_path):
    outs = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for out in outs:
        result = invoke("rescale", ARCH, "-o", out, "-q", "--weights", "kmeans", *TINY)
        assert result.exit_code == 0, result.output
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_rescale_of_a_checkpoint_twice_gives_the_same_bytes(run, tmp_path):
    outs = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for out in outs:
        result = invoke("rescale", run["out"], "--num-classes", "5", "-o", out, "-q", *TINY,
                        "--iters", "2")
        assert result.exit_code == 0, result.output
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_measure_json_twice_is_identical_and_seeded(tmp_path):
    runs = []
    for seed in ("0", "0", "1"):
        result = invoke("measure", ARCH, "--json", "--seed", seed, *TINY)
        assert result.exit_code == 0, result.output
        runs.append(_without_timings(result.stdout))
    assert runs[0] == runs[1]
    rates = [[u["rate_before"] for u in r["units"]] for r in runs]
    assert rates[0] != rates[2]  # the seed draws the architecture's fresh weights


def test_measure_of_a_file_twice_is_identical(tmp_path):
    import timm

    save_file(timm.create_model(ARCH).state_dict(), tmp_path / "w.safetensors")
    runs = [invoke("measure", tmp_path / "w.safetensors", "--arch", ARCH, "--json", *TINY)
            for _ in range(2)]
    assert all(r.exit_code == 0 for r in runs), runs[0].output
    assert _without_timings(runs[0].stdout) == _without_timings(runs[1].stdout)
