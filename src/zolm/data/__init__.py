"""Tasks, prompt templates, data loading and tokenisation (MeZO's protocol for causal LMs)."""

from zolm.data.tasks import TASKS, Example, Splits, TaskSpec, get_task, load_splits
