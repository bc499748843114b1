import io

from updater.install import Progress
from updater.progress import TerminalProgress, human


def test_human() -> None:
    assert [human(n) for n in (0, 1023, 1024, 1536 * 1024, 3 * 1024**3)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 MiB",
        "3.0 GiB",
    ]


def test_bar_redraws_one_line_per_phase() -> None:
    out = io.StringIO()
    bar = TerminalProgress(out, width=10)
    bar(Progress("download", 0, 100))
    bar(Progress("download", 50, 100))
    bar(Progress("download", 100, 100))
    bar(Progress("readback", 100, 100))
    bar.finish()
    text = out.getvalue()
    assert text.count("\n") == 2  # one finished line per phase
    assert "[#####.....]  50.0%" in text
    assert "[##########] 100.0%" in text
    assert text.rstrip("\n").rsplit("\r", 1)[-1].startswith("readback")
