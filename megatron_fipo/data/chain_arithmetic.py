"""A task where a longer chain pays: the sum of several one-digit numbers (or of terms modulo m).

The prompt is ``4+7+2+9=``. The warm start teaches two ways to answer it:

- short: ``Answer: 22`` -- the whole sum in one go;
- worked: ``4+7=11,11+2=13,13+9=22 Answer: 22`` -- one two-operand addition a term, each adding
  the sum just written and the next term of the prompt.

With four terms (examples/tiny_cpu_chain.yaml) the tiny model's warm start gets the worked form
right clearly more often than the short one in 2 of 3 seeds (docs/fipo-vs-dapo.md). With a
modulus m the terms are 0..m-1 and every sum is taken mod m (m = 2: parity of bits, which the same
model did not learn in either form).

Both end in the DAPO answer line (``reward.answer_format: dapo``), so the reward checks them alike.
The prompt says nothing about the form: the policy picks it at its first token, and RL can move
the share of worked answers, and with it the response length.
"""

from __future__ import annotations

import random

from megatron_fipo.data.problems import Problem

SOURCE = "chain_arithmetic"


def answer(terms: list[int], modulus: int = 0) -> int:
    return sum(terms) % modulus if modulus else sum(terms)


def short_form(terms: list[int], modulus: int = 0) -> str:
    return f"Answer: {answer(terms, modulus)}"


def worked_form(terms: list[int], modulus: int = 0) -> str:
    """One two-operand addition per term after the first (running sum + next term, mod ``modulus``
    unless 0), then the answer line."""
    sums = [answer(terms[:i + 1], modulus) for i in range(len(terms))]
    steps = [f"{total}+{term}={after}" for total, term, after in zip(sums, terms[1:], sums[1:])]
    return ",".join(steps) + f" Answer: {sums[-1]}"


def distinct_problems(min_terms: int, max_terms: int, modulus: int = 0) -> int:
    return sum((modulus or 10) ** k for k in range(min_terms, max_terms + 1))


def chain_problems(count: int, min_terms: int, max_terms: int, seed: int, modulus: int = 0) -> list[Problem]:
    """``count`` distinct problems of ``min_terms``..``max_terms`` terms (one-digit, or 0..modulus-1),
    drawn with ``seed``. Each problem's ``references`` hold the worked form first, then the short form.
    """
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    capacity = distinct_problems(min_terms, max_terms, modulus)
    if count > capacity:
        raise ValueError(f"{count} problems asked for, only {capacity} distinct ones exist")
    out = []
    while len(out) < count:
        terms = tuple(rng.randrange(modulus or 10) for _ in range(rng.randint(min_terms, max_terms)))
        if terms in seen:
            continue
        seen.add(terms)
        prompt = "+".join(map(str, terms)) + "="
        out.append(Problem(({"role": "user", "content": prompt},), str(answer(list(terms), modulus)), SOURCE,
                           references=(worked_form(list(terms), modulus), short_form(list(terms), modulus))))
    return out


def response_form(text: str) -> str:
    """worked (it writes additions ``a+b=c``), short (straight to the answer line), or other."""
    head = text.strip().split("Answer", 1)[0].strip()
    if not head:
        return "short"
    return "worked" if "=" in head else "other"


def chain_tokenizer_corpus(problems: list[Problem]) -> list[str]:
    return [p.messages[0]["content"] + " " + ref for p in problems for ref in p.references]
