"""sd-run fuzzed: random option lists (valid, odd and broken values) on the bundled model.

Every run must end with exit status 0 (images written) or 2 (one `sd-run: error:` line), never a traceback, and a
failed run must leave the output folder as it found it.
"""
from __future__ import annotations

import pytest

from leansd.runtime.cli import main
from leansd.runtime.loader import bundled_model_path

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
pytestmark = pytest.mark.skipif(not (bundled_model_path() / "leansd.json").is_file(), reason="no bundled model")

ODD = ["", "0", "-1", "-64", "1e9", "nan", "inf", "abc", "2.5", "\u00e9", "18446744073709551616", "/proc/x.png"]
VALUES = {
    "--steps": ["1", "2"], "--ddim_steps": ["1", "2"], "--guidance": ["0", "1", "7.5"], "--scale": ["7.5"],
    "--width": ["16", "32", "64"], "--height": ["16", "32", "64"], "--W": ["32"], "--H": ["32"], "-n": ["1", "2"],
    "--n_samples": ["1", "2"], "--n_iter": ["1", "2"], "--seed": ["0", "42", "-1"], "--scheduler": ["euler_a", "ddim", "lcm", "nope"],
    "--strength": ["0.5", "1"], "--guidance-cutoff": ["0.3", "1"], "--deep-cache": ["1", "2"], "--eta": ["0", "0.5"],
    "--negative-prompt": ["blurry", ""], "--precision": ["fp32", "int8"], "--backend": ["onnxruntime", "openvino", "tensorrt"],
    "-o": ["out.png", "out/", "sub/x.png", "x.jpg"], "--outdir": ["od"], "--preview": ["p.png", "out.png"],
    "--init-image": ["missing.png", "."], "--ckpt": ["model.ckpt", "."],
}
FLAGS = ["--plms", "--dpm", "--skip_grid", "--grid", "--overwrite", "--low-memory", "--tiled-vae", "--tiny-vae", "-q"]
option = st.one_of(
    st.sampled_from(sorted(VALUES)).flatmap(lambda k: st.tuples(st.just(k), st.sampled_from(VALUES[k] + ODD))),
    st.sampled_from(FLAGS).map(lambda f: (f,)),
)


@hypothesis.settings(max_examples=100, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(prompt=st.sampled_from(["a red circle on a blue background", "", "\u00e9\u00e8 \u2603", "-x"]),
                  options=st.lists(option, max_size=5))
def test_fuzzed_sd_run_exits_cleanly(tmp_path_factory, capsys, monkeypatch, prompt, options):
    work = tmp_path_factory.mktemp("fuzz")
    monkeypatch.chdir(work)
    argv = [prompt, "--steps", "1", *[part for opt in options for part in opt]]
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse refusing an option
        code = exit.code
    err = capsys.readouterr().err
    assert code in (0, 2), (argv, err)
    assert "Traceback" not in err, (argv, err)
    if code == 2:
        errors = [line for line in err.splitlines() if line.startswith("sd-run: error:")]
        assert len(errors) == 1, (argv, err)
        assert not any(p.is_file() for p in work.rglob("*")), (argv, sorted(work.rglob("*")))
