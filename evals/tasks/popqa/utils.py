"""PopQA scoring for lm-eval: an answer is right when it contains one of the gold aliases."""

import json


def process_results(doc, results):
    answers = doc["possible_answers"]
    if isinstance(answers, str):
        answers = json.loads(answers)
    pred = results[0].strip().lower()
    return {"exact_match": float(any(a.strip().lower() in pred for a in answers if a.strip()))}
