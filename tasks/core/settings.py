"""What every config section shares: frozen, unknown keys refused; and the one error a config raises."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

MAX_PROBLEMS_SHOWN = 40  # a value repeated by aliases can fail once per copy; the first ones say it all


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or invalid; the message lists every problem."""


class Section(BaseModel):
    # A misspelt key must be an error, not a silently ignored default.
    model_config = ConfigDict(extra="forbid", frozen=True)


def excerpt(text: object, limit: int = 200) -> str:
    """`text` cut to `limit` characters, saying how long it was: an error quotes input, never all of it."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def problem_list(head: str, problems: list[str]) -> str:
    """`head (N problem(s)):` and one excerpted line per problem, at most MAX_PROBLEMS_SHOWN of them."""
    lines = [f"  - {excerpt(p, 300)}" for p in problems[:MAX_PROBLEMS_SHOWN]]
    if len(problems) > MAX_PROBLEMS_SHOWN:
        lines.append(f"  - ... and {len(problems) - MAX_PROBLEMS_SHOWN} more")
    return f"{head} ({len(problems)} problem(s)):\n" + "\n".join(lines)
