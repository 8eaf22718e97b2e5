"""A custom reward for tests: 1 if the response contains the reference answer, 0.5 if it contains any digit."""


def contains_answer(prompt: str, response: str, answer: str) -> float:
    if answer in response:
        return 1.0
    return 0.5 if any(c.isdigit() for c in response) else 0.0
