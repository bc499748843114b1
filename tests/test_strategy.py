from policies.strategy import STRATEGIES, Immediate, Off, RebootStrategy


def test_strategies() -> None:
    table: list[tuple[RebootStrategy, bool]] = [(Immediate(), True), (Off(), False)]
    for strategy, allowed in table:
        assert strategy.can_finalize() is allowed
        strategy.report_steady()  # nothing held, nothing to release
        assert STRATEGIES[strategy.name] is type(strategy)
