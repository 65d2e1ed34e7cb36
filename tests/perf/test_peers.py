"""perf/peers.py: the benchmark's configurations."""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

PERF = Path(__file__).resolve().parents[2] / "perf"
sys.path.insert(0, str(PERF))

import peers


def test_every_configuration_has_a_name_of_its_own():
    # --peers picks a configuration by name: a second one of the same name could never run.
    twice = [name for name, count in Counter(p.name for p in peers.PEERS).items() if count > 1]
    assert not twice, twice


def test_int8_rows_on_the_plain_export_wait_for_int8_files():
    for peer in peers.PEERS:
        if peer.export == "leansd" and peer.options.get("precision") == "int8":
            assert peer.needs_precision == "int8", peer.name


def test_the_avx2_table_script_names_only_configurations_that_exist():
    # perf/avx2-table.sh waits for an AVX2-only machine; a renamed configuration must not break it unseen.
    import re

    script = (PERF / "avx2-table.sh").read_text()
    named = {name for names in re.findall(r'--peers "?([\w.,-]+)', script) for name in names.split(",")}
    named |= {name for names in re.findall(r'^full_peers=([\w.,-]+)', script, re.M) for name in names.split(",")}
    assert len(named) >= 10, named
    assert not named - {p.name for p in peers.PEERS}, named - {p.name for p in peers.PEERS}
