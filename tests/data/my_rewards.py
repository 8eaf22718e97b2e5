"""A custom reward for tests: 1 if the response contains the reference answer, 0.5 if it contains any digit."""


def contains_answer(prompt: str, response: str, answer: str) -> float:
    if answer in response:
        return 1.0
    return 0.5 if any(c.isdigit() for c in response) else 0.0


def starts_with_seven(prompt: str, response: str, answer: str) -> float:
    """A task any policy masters in a few RL steps: put mass on '7' as the first token (tests/test_learning.py)."""
    return 1.0 if response[:1] == "7" else 0.0


def nan_on_seven(prompt: str, response: str, answer: str):
    return float("nan") if "7" in response else 0.0


def raises_on_seven(prompt: str, response: str, answer: str):
    if "7" in response:
        raise ZeroDivisionError("the grader divided by zero")
    return 0.0


def string_on_seven(prompt: str, response: str, answer: str):
    return "correct" if "7" in response else 0.0


def share_of_ones(prompt: str, response: str, answer: str) -> float:
    """The share of the response's characters that are the digit 1 (chance ≈ 1/16 for the arithmetic alphabet): a
    graded reward that differs between almost any two responses, so no group is all-equal (Â ≠ 0) and a random tiny
    model learns it within a few steps."""
    return response.count("1") / len(response) if response else 0.0
