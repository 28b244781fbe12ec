"""pytest's switch for the full suite (the `--runslow` pattern of pytest's documentation).

    python -m pytest -q              the quick suite: every test not marked `slow` (a few minutes;
                                     it still runs every scan backend against the float64 loop)
    python -m pytest -q --runslow    the full suite, as .ci/run runs it

A `-m` expression given on the command line chooses by itself (`-m slow`: only the slow ones).
"""


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the tests marked slow (trainer and study end to end, exports, install, "
                          "large interpreted Triton shapes): the full suite")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or config.getoption("markexpr"):
        return
    slow = [item for item in items if "slow" in item.keywords]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]
