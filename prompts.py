"""Every text the model is shown: the agent's prompts, the worked examples, the feedback of an invalid action,
and the prompts of the two baselines.

Agent prompts. Zero-shot (a Search-R1-style instruction) suits instruction-tuned 7B models. A 135M model
ignores a bare instruction but copies two worked episodes from its chat history (few-shot): a 1-hop and a
2-hop question about made-up entities, with real BM25 results over five example passages. They are
in-context only, never trained on, and their names are kept out of the synthetic world (EXAMPLE_NAMES).
The 1-hop example is worded like the world's 1-hop questions ("In which city was X born?"), so the two
examples differ as the world's kinds do: a city takes one search, a country two. Worded otherwise, the
policy could read both kinds as one and learn to search once (results/README.md has the runs).

Baselines (evaluate.py): direct answers the question alone, with no search; rag shows the question's own
top-k passages inside <information>, exactly as format_hits renders them for the agent. Few-shot, both show
the two example questions answered in their own format.

Left out: tool calls other than search, and system prompts tuned per model family.
"""
import functools

from search import BM25Index, format_hits

INVALID_ACTION = ("\nMy previous action is invalid. To search, I write the query between <search> and "
                  "</search>. To answer, I write the answer between <answer> and </answer>.\n")

ZERO_SHOT = ("Answer the question below. Think step by step inside <think> and </think> whenever you "
             "receive new information. If you are missing knowledge, call the search engine with "
             "<search> query </search>; its top results come back between <information> and "
             "</information>. You may search as many times as you need. When no more knowledge is "
             "needed, give only the final answer inside <answer> and </answer>, for example "
             "<answer> Paris </answer>. Question: {question}\n")

SYSTEM = ("You answer questions with a search engine. To search, write <search> query </search>; the "
          "results come back between <information> and </information>. Search again if the results "
          "do not contain the answer. When you know the answer, write it as <answer> answer </answer>.")

EXAMPLE_PASSAGES = [
    "Ilvane Dorsk\nIlvane Dorsk is a glassblower who was born in Marrowick. Dorsk trained under Peltro "
    "Quane and later opened a workshop near the Ossel river.",
    "Marrowick\nMarrowick is a harbour town in the country of Venmark. It is known for its salt markets.",
    "Peltro Quane\nPeltro Quane is a glassblower born in Tallowen. Quane taught many apprentices.",
    "Tessaly Brune\nTessaly Brune is a cartographer who works for Grennock Maps, a company founded in "
    "Oskarra.",
    "Oskarra\nOskarra is a mountain city in the country of Dulmere. Its flag is green.",
]
EXAMPLE_NAMES = frozenset({"Ilvane Dorsk", "Marrowick", "Venmark", "Peltro Quane", "Tallowen", "Ossel",
                           "Tessaly Brune", "Grennock Maps", "Oskarra", "Dulmere"})
# (question, search queries in order, answer). Worded as the world's questions are (world.py), so the two
# examples differ only where the kinds do: born in which city, one search; founded in which country, two.
EXAMPLE_EPISODES = [
    ("In which city was Ilvane Dorsk born?", ["Ilvane Dorsk"], "Marrowick"),
    ("In which country was Grennock Maps founded?", ["Grennock Maps", "Oskarra"], "Dulmere"),
]


@functools.cache
def examples_index() -> BM25Index:
    """The BM25 index of EXAMPLE_PASSAGES that the worked examples search (built once)."""
    return BM25Index(EXAMPLE_PASSAGES)


def observation(hits_text: str) -> str:
    return f"\n<information>{hits_text}</information>\n"


def worked_episode(queries: list[str], answer: str, topk: int) -> str:
    """The assistant text of one in-context example, with real search results over EXAMPLE_PASSAGES."""
    hits = examples_index().search(queries, min(topk, 2))
    steps = [f"<search> {q} </search>" + observation(format_hits(h, EXAMPLE_PASSAGES)) for q, h in zip(queries, hits)]
    return "".join(steps) + f"<answer> {answer} </answer>"


def build_messages(question: str, template: str, topk: int = 3) -> list[dict]:
    if template == "zero-shot":
        return [{"role": "user", "content": ZERO_SHOT.format(question=question)}]
    assert template == "few-shot", template
    messages = [{"role": "system", "content": SYSTEM}]
    for example_question, queries, answer in EXAMPLE_EPISODES:
        messages.append({"role": "user", "content": f"Question: {example_question}"})
        messages.append({"role": "assistant", "content": worked_episode(queries, answer, topk)})
    messages.append({"role": "user", "content": f"Question: {question}"})
    return messages


def encode_prompt(tokenizer, question: str, template: str, topk: int = 3) -> list[int]:
    return encode_messages(tokenizer, build_messages(question, template, topk))


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation up to the start of the assistant's reply."""
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    # Base models without a chat template get the same conversation as plain text.
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant: "
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# Baselines: one answer-only turn, with nothing (direct) or the question's own top-k passages (rag)

DIRECT_ZERO_SHOT = ("Answer the question below from your own knowledge; no search engine is available. Give "
                    "only the final answer inside <answer> and </answer>, for example <answer> Paris </answer>. "
                    "Question: {question}\n")
RAG_ZERO_SHOT = ("Answer the question below. Search results for it are given between <information> and "
                 "</information>. Give only the final answer inside <answer> and </answer>, for example "
                 "<answer> Paris </answer>. Question: {question}\n<information>{information}</information>\n")
DIRECT_SYSTEM = "You answer questions from what you know. Write the answer as <answer> answer </answer>."
RAG_SYSTEM = ("You answer questions with the search results given after each question. Write the answer as "
              "<answer> answer </answer>.")


def baseline_messages(question: str, method: str, template: str, information: str = "", topk: int = 3) -> list[dict]:
    """The chat of a baseline. `information` is the formatted hits for rag (ignored by direct). Few-shot
    shows the agent's two example questions answered in this baseline's format; rag's examples retrieve
    over EXAMPLE_PASSAGES with the example question as the query, at least two passages so the two-hop
    example's answer is among them."""
    assert method in ("direct", "rag"), method
    if template == "zero-shot":
        prompt = DIRECT_ZERO_SHOT if method == "direct" else RAG_ZERO_SHOT
        return [{"role": "user", "content": prompt.format(question=question, information=information)}]
    assert template == "few-shot", template

    def question_turn(text, hits_text):
        return f"Question: {text}" + (f"\n<information>{hits_text}</information>" if method == "rag" else "")

    messages = [{"role": "system", "content": DIRECT_SYSTEM if method == "direct" else RAG_SYSTEM}]
    for example_question, _, answer in EXAMPLE_EPISODES:
        hits_text = format_hits(examples_index().search([example_question], max(topk, 2))[0], EXAMPLE_PASSAGES)
        messages.append({"role": "user", "content": question_turn(example_question, hits_text)})
        messages.append({"role": "assistant", "content": f"<answer> {answer} </answer>"})
    messages.append({"role": "user", "content": question_turn(question, information)})
    return messages


def baseline_prompts(tokenizer, index: BM25Index, examples, method: str, template: str, topk: int,
                     shuffle=None) -> list[list[int]]:
    """Prompt token ids per example; rag searches the index once for all the questions (passages shown as
    format_hits shows them to the agent, their lines in an order `shuffle` draws if given)."""
    informations = [""] * len(examples)
    if method == "rag":
        hits = index.search([example.question for example in examples], topk)
        informations = [format_hits(h, index.texts, shuffle) for h in hits]
    return [encode_messages(tokenizer, baseline_messages(example.question, method, template, information, topk))
            for example, information in zip(examples, informations)]
