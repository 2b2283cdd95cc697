"""Prompt templates and verbalizers (MeZO, Malladi et al. 2023, App. E.2 / Table 14; PromptSource-style).

Each function turns one dataset row (Hugging Face schema) into an :class:`Example`: the prompt and the
candidate continuations appended to it. A candidate's leading space or newline is part of the template,
e.g. SST-2 scores ``"<sentence> It was"`` + ``" great"``. Classification labels map to candidates in the
order of the verbalizer (label i -> candidates[i]).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """A prompt, its candidate continuations and the index of the correct one."""

    prompt: str
    candidates: tuple[str, ...]
    gold: int
    answers: tuple[str, ...] = ()  # reference answers of generation tasks (SQuAD), for EM/F1
    prompts: tuple[str, ...] = ()  # one prompt per candidate (partial scoring, WinoGrande); overrides ``prompt``

    def prompt_for(self, i: int) -> str:
        """The prompt candidate ``i`` continues."""
        return self.prompts[i] if self.prompts else self.prompt


def sst2(row: dict) -> Example:
    return Example(f"{row['sentence'].strip()} It was", (" terrible", " great"), int(row["label"]))


def rte(row: dict) -> Example:
    prompt = f"{row['premise']}\nDoes this mean that \"{row['hypothesis']}\" is true? Yes or No?\n"
    return Example(prompt, ("Yes", "No"), int(row["label"]))


def cb(row: dict) -> Example:
    prompt = f"Suppose {row['premise']} Can we infer that \"{row['hypothesis']}\"? Yes, No, or Maybe?\n"
    return Example(prompt, ("Yes", "No", "Maybe"), int(row["label"]))


def boolq(row: dict) -> Example:
    """MeZO's BoolQ template V3: question capitalised, '?' added when missing."""
    q = row["question"]
    q = q if q.endswith("?") else q + "?"
    q = q[0].upper() + q[1:]
    return Example(f"{row['passage']} {q}\n", ("No", "Yes"), int(row["label"]))


def wsc(row: dict) -> Example:
    prompt = (f"{row['text']}\nIn the previous sentence, does the pronoun \"{row['span2_text'].lower()}\" "
              f"refer to {row['span1_text']}? Yes or No?\n")
    return Example(prompt, ("No", "Yes"), int(row["label"]))


def wic(row: dict) -> Example:
    prompt = (f"Does the word \"{row['word']}\" have the same meaning in these two sentences? Yes, No?\n"
              f"{row['sentence1']}\n{row['sentence2']}\n")
    return Example(prompt, ("No", "Yes"), int(row["label"]))


def multirc(row: dict) -> Example:
    prompt = (f"{row['paragraph']}\nQuestion: {row['question']}\nI found this answer \"{row['answer']}\". "
              f"Is that correct? Yes or No?\n")
    return Example(prompt, ("No", "Yes"), int(row["label"]))


def _copa_choice(text: str) -> str:
    words = text.split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " ".join(words)


def copa(row: dict) -> Example:
    """Premise without its final period, joined by ' so ' (effect) or ' because ' (cause)."""
    premise = row["premise"].rstrip()
    premise = premise[:-1] if premise.endswith(".") else premise
    conj = {"effect": " so ", "cause": " because "}[row["question"]]
    return Example(premise + conj, (_copa_choice(row["choice1"]), _copa_choice(row["choice2"])), int(row["label"]))


def squad(row: dict) -> Example:
    """Generation: trained on ' <first answer>\\n' with teacher forcing, evaluated by greedy decoding."""
    answers = tuple(row["answers"]["text"])
    prompt = f"Title: {row['title']}\nContext: {row['context']}\nQuestion: {row['question'].strip()}\nAnswer:"
    return Example(prompt, (f" {answers[0]}\n",), 0, answers)


# Zero-shot multiple-choice tasks (the pruning papers' suite). GPT-3 / MeZO style: "Question: ...\nAnswer:" and
# each choice appended after a space; scored by the mean log-probability of the choice's tokens.


def _qa(question: str, choices: list[str], gold: int) -> Example:
    return Example(f"Question: {question.strip()}\nAnswer:", tuple(" " + c.strip() for c in choices), gold)


def piqa(row: dict) -> Example:
    """PIQA: the goal as the question, the two solutions as choices (label 0 -> sol1)."""
    return _qa(row["goal"], [row["sol1"], row["sol2"]], int(row["label"]))


def _arc(row: dict) -> Example:
    """ARC (ai2_arc schema): 3-5 choices; the gold one is the position of ``answerKey`` among the labels."""
    labels = [str(x) for x in row["choices"]["label"]]
    return _qa(row["question"], list(row["choices"]["text"]), labels.index(str(row["answerKey"]).strip()))


arc_easy = _arc
arc_challenge = _arc


def openbookqa(row: dict) -> Example:
    """OpenBookQA (main): ``question_stem`` as the question, four choices, ``answerKey`` A-D."""
    labels = [str(x) for x in row["choices"]["label"]]
    return _qa(row["question_stem"], list(row["choices"]["text"]), labels.index(str(row["answerKey"]).strip()))


def winogrande(row: dict) -> Example:
    """WinoGrande with partial scoring (Trinh & Le 2018; GPT-3 and lm-eval-harness do the same).

    The sentence is cut at its blank "_": candidate i's prompt is the part before the blank with option i filled
    in, and every candidate is the same continuation (the part after the blank), so the score compares
    log p(continuation | prefix with option i). ``answer`` "1" / "2" -> gold 0 / 1.
    """
    sentence = row["sentence"]
    cut = sentence.index("_")
    prompts = tuple(sentence[:cut] + row[f"option{k}"] for k in (1, 2))
    rest = " " + sentence[cut + 1:].strip()
    return Example(prompts[0], (rest, rest), int(row["answer"]) - 1, prompts=prompts)
