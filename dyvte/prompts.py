"""Chat prompts, built one way for every path (label pass, inference, evaluation, harness, testbed): Hugging Face
chat messages rendered by the processor's own chat template.

A question may carry the LLaVA `<image>` placeholder; it is removed and the image goes in as an image part of the
user turn, where the processor's template puts the model's own image markers.
"""

IMAGE_PLACEHOLDER = "<image>"


def user_message(text: str, images: int = 1) -> dict:
    """A user turn: `images` image parts, then `text` without the `<image>` placeholder."""
    content = [{"type": "image"} for _ in range(images)]
    return {"role": "user", "content": content + [{"type": "text", "text": text.replace(IMAGE_PLACEHOLDER, "").strip()}]}


def assistant_message(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def check_chat_template(processor) -> None:
    """A processor without a chat template cannot build prompts: say so, naming the fix."""
    if not getattr(processor, "chat_template", None) and not getattr(processor.tokenizer, "chat_template", None):
        raise ValueError(
            f"the processor {type(processor).__name__} has no chat template, so dyvte cannot build prompts for it; "
            "load a checkpoint whose processor ships one (chat_template.jinja) or set processor.chat_template."
        )


def chat_prompt(processor, question: str, images: int = 1, history: list[dict] | tuple = ()) -> str:
    """The generation prompt for `question` about `images` images, after the earlier turns in `history`."""
    check_chat_template(processor)
    messages = list(history) + [user_message(question, images)]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def chat_completion(processor, question: str, answer: str, images: int = 1, history: list[dict] | tuple = ()) -> str:
    """The conversation up to `answer` as the chat template writes the assistant's turn, without what the template
    puts after the answer (its end-of-turn text): what the model has produced once it has generated `answer`."""
    check_chat_template(processor)
    messages = list(history) + [user_message(question, images), assistant_message(answer.strip())]
    return processor.apply_chat_template(messages, continue_final_message=True)
