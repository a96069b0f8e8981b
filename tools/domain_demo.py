"""A generated finance-and-law domain set: the smallest honest stand-in for YunShan's data.

Every answer follows from its question by a fixed rule (interest, percentage change, tax brackets,
contract validity, limitation periods, inheritance shares), so a model can learn the domain from
the examples alone, and a held-out multiple-choice split measures whether it did. The wrong options
come from the mistakes people make with the same rules (forgetting the years, flipping the sign,
using the wrong limitation period), so they read as plausibly as the right one.

Nothing is downloaded; the same seed gives the same files. Outputs in `--out`:

    train.jsonl          chat records {"messages": [...]} for instruction tuning
    heldout_mc.jsonl     {"question", "choices" (4), "answer" (index), "family", "domain"}
    domain.txt           domain prose for continued pretraining and tokenizer extension
    domain_heldout.txt   prose about the held-out questions only, for perplexity
    manifest.json        seed, counts per family

Held-out questions share no underlying case (same family and numbers) with the training ones.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

NAMES = [
    "Alice",
    "Bruno",
    "Chen",
    "Dana",
    "Emeka",
    "Fatima",
    "Gustav",
    "Hana",
    "Ivan",
    "Jia",
    "Kofi",
    "Lena",
    "Mateo",
    "Nadia",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sven",
    "Tariq",
    "Uma",
    "Viktor",
    "Wen",
    "Yusuf",
    "Zara",
]
SYSTEM_PROMPTS = [
    "You are a careful assistant for finance and law questions. Show the rule, then the answer.",
    "You answer banking, tax and legal questions precisely.",
]
# Limitation periods in years by kind of claim: the domain "knowledge" the model has to learn.
LIMITATION = {
    "breach of contract": 6,
    "personal injury": 3,
    "property damage": 4,
    "defamation": 1,
    "unpaid wages": 2,
}
GLOSSARY = {
    "amortization": "paying off a loan in regular instalments of principal and interest",
    "collateral": "an asset pledged to secure a loan, which the lender may seize on default",
    "fiduciary": "a person bound to act in another's best interest, such as a trustee",
    "indemnity": "a promise to compensate another party for a loss",
    "liquidated damages": "a sum fixed in a contract as compensation for a breach",
    "statute of limitations": "the period after which a claim can no longer be brought",
    "compound interest": "interest earned on both the principal and the interest already added",
    "simple interest": "interest earned on the principal only",
    "marginal tax rate": "the rate applied to the last dollar of income",
    "duress": "pressure or threats that take away free consent to a contract",
    "intestate succession": "the default division of an estate when there is no will",
    "arbitration": "settling a dispute by an arbitrator instead of a court",
}


@dataclass
class Case:
    family: str
    domain: str
    question: str
    answer: str
    distractors: list[str]
    key: tuple  # the underlying case: held-out and train never share one
    rule: str = ""  # one sentence stating the rule, for the domain prose
    extra: dict = field(default_factory=dict)


def money(x: float) -> str:
    return f"${x:,.2f}" if round(x, 2) != int(round(x, 2)) else f"${round(x):,}"


def _distinct(correct: str, candidates: list[str], rng: random.Random, k: int = 3) -> list[str]:
    seen, out = {correct}, []
    for c in candidates:
        if c not in seen:
            seen.add(c)
            out.append(c)
    rng.shuffle(out)
    return out[:k]


# --- finance ----------------------------------------------------------------------------------------


def simple_interest(rng: random.Random) -> Case:
    p, r, t = rng.randrange(100, 2100, 100), rng.randint(1, 12), rng.randint(2, 6)
    name = rng.choice(NAMES)
    q = rng.choice(
        [
            (
                f"{name} deposits {money(p)} at {r}% simple interest per year. "
                f"How much interest is earned after {t} years?"
            ),
            f"What is the simple interest on a {money(p)} loan at {r}% a year for {t} years?",
            f"A bond pays {r}% simple interest a year on {money(p)}. What interest does it pay over {t} years?",
        ]
    )

    def say(pp, rr, tt):
        interest = money(pp * rr * tt / 100)
        return f"Simple interest = principal × rate × years = {money(pp)} × {rr}% × {tt} = {interest}."

    wrong = [
        f"Simple interest = principal × rate = {money(p)} × {r}% = {money(p * r / 100)}.",
        say(p, r, t + 1),
        say(p, r + 1, t),
        f"Simple interest = principal × rate × years = {money(p)} × {r}% × {t} = {money(p + p * r * t / 100)}.",
    ]
    return Case(
        "simple_interest",
        "finance",
        q,
        say(p, r, t),
        _distinct(say(p, r, t), wrong, rng),
        ("si", p, r, t),
        "Simple interest is the principal times the yearly rate times the number of years.",
    )


def compound_interest(rng: random.Random) -> Case:
    p, r, t = rng.randrange(1000, 10001, 500), rng.randint(2, 10), rng.randint(2, 4)
    q = rng.choice(
        [
            (
                f"{rng.choice(NAMES)} invests {money(p)} at {r}% a year, compounded annually. "
                f"What is the balance after {t} years?"
            ),
            (
                f"A deposit of {money(p)} earns {r}% compound interest per year. "
                f"How much is in the account after {t} years?"
            ),
        ]
    )

    def say(rr, tt, value=None):
        v = p * (1 + rr / 100) ** tt if value is None else value
        return f"Balance = principal × (1 + rate)^years = {money(p)} × (1 + {rr}%)^{tt} = {money(round(v, 2))}."

    wrong = [say(r, t, p * (1 + r * t / 100)), say(r, t - 1), say(r, t + 1), say(r + 1, t)]
    return Case(
        "compound_interest",
        "finance",
        q,
        say(r, t),
        _distinct(say(r, t), wrong, rng),
        ("ci", p, r, t),
        "With annual compounding the balance is the principal times (1 + rate) to the power of the years.",
    )


def percent_change(rng: random.Random) -> Case:
    a = rng.randrange(20, 1001, 20)
    pct = rng.choice([-50, -40, -25, -20, -10, -5, 5, 10, 15, 20, 25, 40, 50, 60, 75, 100])
    b = a * (100 + pct) // 100
    thing = rng.choice(["share price", "monthly revenue", "fund's unit price", "rent", "bond price"])
    q = rng.choice(
        [
            f"The {thing} moved from {money(a)} to {money(b)}. What is the percentage change?",
            f"A {thing} was {money(a)} last year and is {money(b)} now. By what percentage did it change?",
        ]
    )

    def say(x):
        return f"Percentage change = (new − old) / old = ({money(b)} − {money(a)}) / {money(a)} = {x:+g}%."

    ratio = round(100 * (b - a) / b, 1) if b else 0
    wrong = [say(-pct), say(ratio), say(pct * 2), say(pct / 2), say(100 + pct)]
    return Case(
        "percent_change",
        "finance",
        q,
        say(pct),
        _distinct(say(pct), wrong, rng),
        ("pc", a, pct),
        "The percentage change is the difference between new and old value divided by the old value.",
    )


def _brackets(rng: random.Random) -> tuple[int, int, int, int]:
    low = rng.choice([10_000, 12_000, 15_000])
    high = rng.choice([40_000, 50_000, 60_000])
    r1, r2 = rng.choice([(10, 20), (10, 30), (15, 25), (20, 40)])
    return low, high, r1, r2


def _bracket_text(low, high, r1, r2) -> str:
    return (
        f"Tax is 0% on income up to {money(low)}, {r1}% between {money(low)} and {money(high)}, "
        f"and {r2}% above {money(high)}."
    )


def marginal_rate(rng: random.Random) -> Case:
    low, high, r1, r2 = _brackets(rng)
    income = rng.randrange(2_000, 100_001, 1_000)
    if income in (low, high):
        income += 1_000
    q = f"{_bracket_text(low, high, r1, r2)} What is the marginal tax rate on an income of {money(income)}?"
    verdicts = {
        0: f"The marginal rate is 0%, since {money(income)} is below {money(low)}.",
        r1: f"The marginal rate is {r1}%, since {money(income)} is between {money(low)} and {money(high)}.",
        r2: f"The marginal rate is {r2}%, since {money(income)} is above {money(high)}.",
    }
    rate = 0 if income < low else r1 if income < high else r2
    wrong = [v for k, v in verdicts.items() if k != rate] + [
        f"The marginal rate is {r1 + r2}%, since both brackets apply."
    ]
    return Case(
        "marginal_rate",
        "finance",
        q,
        verdicts[rate],
        _distinct(verdicts[rate], wrong, rng),
        ("mr", low, high, r1, r2, income),
        "The marginal rate is the rate of the bracket that the income falls in.",
    )


def tax_owed(rng: random.Random) -> Case:
    low, high, r1, r2 = _brackets(rng)
    income = rng.randrange(high + 5_000, 150_001, 5_000)
    q = f"{_bracket_text(low, high, r1, r2)} How much tax is owed on an income of {money(income)}?"

    def say(a, b):
        return (
            f"Tax = ({money(high)} − {money(low)}) × {r1}% + ({money(income)} − {money(high)}) × {r2}% "
            f"= {money(a)} + {money(b)} = {money(a + b)}."
        )

    first, second = (high - low) * r1 / 100, (income - high) * r2 / 100
    flat = income * r2 / 100
    wrong = [
        say(first, (income - low) * r2 / 100),
        f"Tax = {money(income)} × {r2}% = {money(flat)}.",
        say(high * r1 / 100, second),
        say(first, (income - high) * r1 / 100),
    ]
    return Case(
        "tax_owed",
        "finance",
        q,
        say(first, second),
        _distinct(say(first, second), wrong, rng),
        ("to", low, high, r1, r2, income),
        "Progressive tax charges each bracket's rate only on the part of the income inside that bracket.",
    )


# --- law --------------------------------------------------------------------------------------------

CONTRACT_VERDICTS = {
    "minor": "The contract is void: {minor} is under 18, and a minor cannot be bound by it.",
    "duress": "The contract is void: it was signed under duress, so consent was not free.",
    "illegal": "The contract is void: its purpose is illegal.",
    "writing": "The contract is unenforceable: a sale of land must be in writing.",
    "valid": (
        "The contract is valid: both parties are adults, consent was free, the purpose is lawful and the form is right."
    ),
}


def contract_validity(rng: random.Random) -> Case:
    a, b = rng.sample(NAMES, 2)
    defect = rng.choice(["minor", "duress", "illegal", "writing", "valid", "valid"])
    age_a, age_b = rng.randint(18, 70), rng.randint(18, 70)
    if defect == "minor":
        age_b = rng.randint(12, 17)
    land = defect == "writing" or rng.random() < 0.3
    subject = (
        rng.choice(["a plot of land", "a farm field"])
        if land
        else rng.choice(["a used car", "a piano", "a delivery van", "office furniture", "a laptop"])
    )
    if defect == "illegal":
        subject = rng.choice(["stolen jewellery", "smuggled cigarettes", "counterfeit banknotes"])
    form = "orally" if defect == "writing" else rng.choice(["in writing", "in writing"] + ([] if land else ["orally"]))
    consent = (
        "after being threatened by" if defect == "duress" else rng.choice(["freely with", "after negotiating with"])
    )
    q = (
        f"{a} (aged {age_a}) agrees {form} to sell {subject} to {b} (aged {age_b}). {b} signs {consent} {a}. "
        "Is the contract valid?"
    )
    verdicts = {k: v.format(minor=b) for k, v in CONTRACT_VERDICTS.items()}
    return Case(
        "contract_validity",
        "law",
        q,
        verdicts[defect],
        _distinct(verdicts[defect], list(verdicts.values()), rng),
        ("cv", defect, age_a, age_b, subject, form, consent),
        "A contract is void if a party is under 18, if it was signed under duress or if its purpose is "
        "illegal; a sale of land must also be in writing.",
    )


def limitation(rng: random.Random) -> Case:
    claim, limit = rng.choice(list(LIMITATION.items()))
    start = rng.randint(1990, 2020)
    elapsed = rng.randint(max(0, limit - 3), limit + 3)
    if elapsed == limit:
        elapsed += rng.choice([-1, 1])
    elapsed = max(elapsed, 0)
    filed = start + elapsed
    stated = rng.random() < 0.5
    who = rng.choice(NAMES)
    period = f" The limitation period for {claim} is {limit} years." if stated else ""
    q = (
        f"The events giving rise to a {claim} claim by {who} happened in {start}, "
        f"and the claim was filed in {filed}.{period} Is the claim time-barred?"
    )

    def say(e, lim, barred=None):
        barred = e > lim if barred is None else barred
        relation = f"more than the {lim}-year limit" if e > lim else f"within the {lim}-year limit"
        verdict = "the claim is time-barred" if barred else "the claim may proceed"
        return f"{e} years passed, {relation} for {claim}: {verdict}."

    other_limit = rng.choice([v for v in sorted(set(LIMITATION.values())) if v != limit])
    wrong = [
        say(elapsed, limit, barred=elapsed <= limit),  # the right arithmetic, the wrong conclusion
        say(elapsed, other_limit),  # another claim's period
        say(elapsed + 2, limit),
        say(max(elapsed - 2, 0), limit),
    ]
    return Case(
        "limitation",
        "law",
        q,
        say(elapsed, limit),
        _distinct(say(elapsed, limit), wrong, rng),
        ("lim", claim, start, elapsed),
        f"A claim for {claim} must be filed within {limit} years of the events.",
    )


def filing_deadline(rng: random.Random) -> Case:
    claim, limit = rng.choice(list(LIMITATION.items()))
    start = rng.randint(1980, 2024)
    q = f"A {claim} claim arises in {start}. What is the last year in which it can be filed?"

    def say(lim, year):
        return f"The limitation period for {claim} is {lim} years, so the last year to file is {year}."

    other = rng.choice([v for v in sorted(set(LIMITATION.values())) if v != limit])
    wrong = [say(other, start + other), say(limit, start + limit + 1), say(limit, start + limit - 1)]
    return Case(
        "filing_deadline",
        "law",
        q,
        say(limit, start + limit),
        _distinct(say(limit, start + limit), wrong, rng),
        ("fd", claim, start),
        f"The last year to file a {claim} claim is the year it arose plus {limit}.",
    )


def inheritance(rng: random.Random) -> Case:
    k = rng.randint(2, 5)
    spouse = rng.random() < 0.6
    estate = 2 * k * (k + 1) * rng.randint(1, 60) * 500  # every share below comes out in whole dollars
    family = f"a spouse and {k} children" if spouse else f"{k} children and no spouse"
    q = rng.choice(
        [
            (
                f"{rng.choice(NAMES)} dies without a will, leaving an estate of {money(estate)}, {family}. "
                "Under the default rule, how much does each child inherit?"
            ),
            f"An estate of {money(estate)} passes by intestate succession to {family}. What is each child's share?",
        ]
    )

    def say(share, with_spouse):
        rule = (
            "The spouse takes half and the children share the other half equally"
            if with_spouse
            else "With no spouse, the children share the whole estate equally"
        )
        return f"{rule}: each child receives {money(share)}."

    right = estate / 2 / k if spouse else estate / k
    wrong = [
        say(estate / k, spouse),
        say(estate / 2 / k, spouse),
        say(estate / (k + 1), spouse),
        say(estate / 2, spouse),
        say(estate / 2 / (k + 1), not spouse),
    ]
    return Case(
        "inheritance",
        "law",
        q,
        say(right, spouse),
        _distinct(say(right, spouse), wrong, rng),
        ("in", estate, k, spouse),
        "Without a will, a spouse takes half of the estate and the children share the rest equally; "
        "with no spouse the children share all of it.",
    )


FAMILIES: dict[str, Callable[[random.Random], Case]] = {
    f.__name__: f
    for f in (
        simple_interest,
        compound_interest,
        percent_change,
        marginal_rate,
        tax_owed,
        contract_validity,
        limitation,
        filing_deadline,
        inheritance,
    )
}


# --- assembling the splits ---------------------------------------------------------------------------


def _draw(family: Callable, rng: random.Random, taken: set, n: int, patience: int = 2000) -> list[Case]:
    """Up to n cases with keys not in `taken` (which grows); fewer once `patience` draws in a row
    find nothing new, i.e. when the family's cases are nearly used up."""
    out, misses = [], 0
    while len(out) < n and misses < patience:
        case = family(rng)
        if case.key not in taken and len(case.distractors) == 3:
            taken.add(case.key)
            out.append(case)
            misses = 0
        else:
            misses += 1
    return out


def chat_record(case: Case, rng: random.Random) -> dict:
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.3 else []
    messages += [{"role": "user", "content": case.question}, {"role": "assistant", "content": case.answer}]
    return {"messages": messages, "family": case.family}


def preference_record(case: Case, rng: random.Random) -> dict:
    """The right answer preferred to a plausible wrong one of the same family (one of the case's
    distractors), in the conversational preference layout `finetune.mode: dpo` reads."""
    prompt = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.3 else []
    prompt.append({"role": "user", "content": case.question})
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": case.answer}],
            "rejected": [{"role": "assistant", "content": rng.choice(case.distractors)}], "family": case.family}


def mc_record(case: Case, rng: random.Random, position: int) -> dict:
    choices = list(case.distractors)
    choices.insert(position, case.answer)
    return {
        "question": case.question,
        "choices": choices,
        "answer": position,
        "family": case.family,
        "domain": case.domain,
    }


def prose(case: Case) -> str:
    return f"{case.rule} For example: {case.question} {case.answer}"


def glossary_lines(rng: random.Random, n: int) -> list[str]:
    items = list(GLOSSARY.items())
    forms = ["In finance and law, {t} means {d}.", "The term {t} refers to {d}.", "{T}: {d}."]
    return [rng.choice(forms).format(t=t, T=t.capitalize(), d=d) for t, d in (rng.choice(items) for _ in range(n))]


def generate(out_dir, seed: int = 0, train: int = 4000, heldout: int = 360, text_lines: int = 6000) -> dict:
    """Write the domain set into `out_dir`; returns the manifest."""
    if min(train, heldout, text_lines) < len(FAMILIES):
        raise ValueError(f"train, heldout and text_lines must each be at least {len(FAMILIES)} (one per family)")
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    families = list(FAMILIES.items())
    held_keys: set = set()
    held: list[Case] = []
    for i, (_name, fam) in enumerate(families):
        share = heldout // len(families) + (i < heldout % len(families))
        held += _draw(fam, rng, held_keys, share)
    rng.shuffle(held)  # families interleaved, so any prefix (eval --limit) is a fair sample
    positions = [i % 4 for i in range(len(held))]  # the right answer sits in each slot equally often
    rng.shuffle(positions)

    train_keys = set(held_keys)
    train_cases: list[Case] = []
    for i, (name, fam) in enumerate(families):
        share = train // len(families) + (i < train % len(families))
        # Each case once, then (if a family's cases run out) again in another phrasing.
        cases = _draw(fam, rng, train_keys, share)
        for _ in range(100 * share):
            if len(cases) >= share:
                break
            extra = fam(rng)
            if extra.key not in held_keys and len(extra.distractors) == 3:
                cases.append(extra)
        if len(cases) < share:
            raise ValueError(f"family {name} has too few cases left after the held-out split; ask for fewer held-out")
        train_cases += cases
    rng.shuffle(train_cases)

    text_cases = []
    text_keys = set(held_keys)
    for _name, fam in families:
        share = (text_lines * 3 // 4) // len(families)
        text_cases += [c for c in (fam(rng) for _ in range(share * 3)) if c.key not in text_keys][:share]
    text = [prose(c) for c in text_cases] + glossary_lines(rng, text_lines - len(text_cases))
    rng.shuffle(text)

    def write_jsonl(name: str, rows: list[dict]) -> None:
        with open(out / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)

    write_jsonl("train.jsonl", [chat_record(c, rng) for c in train_cases])
    write_jsonl("heldout_mc.jsonl", [mc_record(c, rng, p) for c, p in zip(held, positions)])
    # Its own generator: the files above stay what they were before the preference pairs existed.
    pair_rng = random.Random(seed * 7_717 + 3)
    write_jsonl("preference.jsonl", [preference_record(c, pair_rng) for c in train_cases])
    (out / "domain.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    (out / "domain_heldout.txt").write_text("\n".join(prose(c) for c in held) + "\n", encoding="utf-8")
    manifest = {
        "seed": seed,
        "train": len(train_cases),
        "preference_pairs": len(train_cases),
        "heldout": len(held),
        "domain_text_lines": len(text),
        "train_families": dict(Counter(c.family for c in train_cases)),
        "heldout_families": dict(Counter(c.family for c in held)),
        "chance_accuracy": 0.25,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


# Facts a long document states once and asks for at its end (the long-context stage's training signal).
KEY_NAMES = ("pass key", "case number", "account number", "docket number", "file reference", "registration number")
DOCUMENT_KINDS = ("filing", "judgment", "prospectus", "ruling", "annual report", "contract file")


def long_documents(domain_text, out_path, n_docs: int, seed: int = 0, lines: tuple[int, int] = (1, 4),
                   facts: tuple[int, int] = (1, 3)) -> Path:
    """Long synthetic legal and financial documents as JSONL `{"text"}`: runs of the domain prose
    (between `lines` lines each) with one to three numbered facts stated at random depths and asked
    for at the end, each answer following its question. A model learns from them to find a fact
    anywhere in its context; several facts a document give it more of that signal per token."""
    rng = random.Random(f"long:{seed}")
    prose_lines = [ln for ln in Path(domain_text).read_text(encoding="utf-8").splitlines() if ln.strip()]
    out_path = Path(out_path)
    with open(out_path, "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            body = rng.sample(prose_lines, rng.randint(*lines))
            kind = rng.choice(DOCUMENT_KINDS)
            planted = [(name, rng.randint(10_000, 99_999)) for name in rng.sample(KEY_NAMES, rng.randint(*facts))]
            for name, key in planted:
                fact = rng.choice([f"The {name} of this {kind} is {key}.", f"Note: the {name} is {key}.",
                                   f"For the record, the {name} is {key}; keep it."])
                body.insert(rng.randint(0, len(body)), fact)
            rng.shuffle(planted)
            questions = "".join(f"\nWhat is the {name}? The {name} is {key}." for name, key in planted)
            f.write(json.dumps({"text": " ".join(body) + questions}, ensure_ascii=False) + "\n")
    return out_path


def generate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/domain_demo.py",
        description="Generate the seeded finance/law demo set: chat training data, held-out multiple choice, "
        "domain text.",
    )
    parser.add_argument("--out", required=True, help="folder to write into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=4000, help="training chat records")
    parser.add_argument("--heldout", type=int, default=360, help="held-out multiple-choice questions")
    parser.add_argument("--text-lines", type=int, default=6000, help="lines of domain prose")
    args = parser.parse_args(argv)
    try:
        manifest = generate(args.out, args.seed, args.train, args.heldout, args.text_lines)
    except ValueError as err:
        parser.error(str(err))
    print(
        f"wrote {args.out}: {manifest['train']} training records, {manifest['heldout']} held-out questions "
        f"(chance 25%), {manifest['domain_text_lines']} lines of domain text"
    )
    return 0


if __name__ == "__main__":
    sys.exit(generate_main())
