"""Progress bars: tqdm when installed and stderr is a terminal, else silent."""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["Progress", "progress"]


class Progress(Protocol):
    """The part of tqdm's interface gristmill uses."""

    def update(self, n: float = 1) -> bool | None:
        """Advance by n."""

    def close(self) -> None:
        """Finish the bar."""


class _Silent:
    def update(self, n: float = 1) -> bool | None:
        return None

    def close(self) -> None:
        pass


def progress(total: float | None, desc: str, unit: str = "it", enabled: bool = True,
             **kwargs: Any) -> Progress:
    """A progress bar (tqdm; it hides itself when stderr is not a terminal)."""
    if not enabled:
        return _Silent()
    try:
        from tqdm import tqdm
    except ImportError:  # the light client without the cli extra
        return _Silent()
    bar: Progress = tqdm(total=total, desc=desc, unit=unit, disable=None, dynamic_ncols=True,
                         unit_scale=unit == "B", unit_divisor=1024 if unit == "B" else 1000,
                         **kwargs)
    return bar
