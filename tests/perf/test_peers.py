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
