from ops_pipeline.ops.tests import parse_tap

NODE_TAP = """TAP version 13
# Subtest: config validation
    # Subtest: lists every missing variable
    ok 1 - lists every missing variable
      ---
      duration_ms: 1.2
      ...
    # Subtest: rejects a short secret
    not ok 2 - rejects a short secret
      ---
      error: 'expected 503'
      ...
    1..2
not ok 1 - config validation
# Subtest: health
ok 2 - health
# Subtest: skipped one
ok 3 - skipped one # SKIP no database
1..3
# tests 4
# suites 1
# pass 2
# fail 1
# cancelled 0
# skipped 1
# todo 0
"""


def test_node_tap_counts_and_leaf_failure_names():
    rep = parse_tap(NODE_TAP)
    assert (rep.total, rep.passed, rep.failed, rep.skipped) == (4, 2, 1, 1)
    assert rep.failures == ["config validation > rejects a short secret"]


def test_plain_tap_without_summary_is_counted_from_lines():
    rep = parse_tap("1..3\nok 1 - a\nnot ok 2 - b\nok 3 - c # SKIP later\n")
    assert (rep.total, rep.passed, rep.failed, rep.skipped) == (3, 1, 1, 1)
    assert rep.failures == ["b"]
