"""Text to token ids as the trainer and the sampler feed the model: a prompt (plain or through the
chat template, bos first), a revision conversation, a demonstration (no bos, eos last)."""

from __future__ import annotations

from amft_cli.model import ModelError


def encode_prompt(tokenizer, prompt: str | list[dict], chat_template: bool) -> list[int]:
    """Token ids of `prompt` as the model should continue it, starting with bos
    when the tokenizer has one; wrapped in the chat template (with the
    assistant-turn header) when `chat_template` is true. A prompt is a user
    message (str) or whole chat messages [{role, content}] (a system prompt
    from the data, as LUFFY's files carry), which need the chat template."""
    if isinstance(prompt, list) and not chat_template:
        raise ModelError("the data's prompts are chat messages but model.chat_template is false; set "
                         "--set model.chat_template=true or --set task.prompt=instruction")
    if chat_template:
        if not tokenizer.chat_template:
            raise ModelError("model.chat_template is true but the tokenizer has no chat template")
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def plain_transcript(messages: list[dict]) -> str:
    """A revision conversation (tasks/revision.py) as plain text for models without a chat
    template: each answer and each feedback line end with a newline, and the task prompt follows
    every feedback line again, so each attempt continues the same cue as the first one.
    [user p, assistant a, user f] -> "p" + "a\\n" + "f\\n" + "p"."""
    if messages[0]["role"] != "user" or len(messages) > 1 and messages[1]["role"] != "assistant":
        raise ModelError("the data's prompts are chat messages but model.chat_template is false; set "
                         "--set model.chat_template=true or --set task.prompt=instruction")
    prompt, text = messages[0]["content"], messages[0]["content"]
    for message in messages[1:]:
        text += message["content"] + "\n" + (prompt if message["role"] == "user" else "")
    return text


def encode_transcript(tokenizer, messages: list[dict], chat_template: bool) -> list[int]:
    """Token ids of a revision conversation for the model to continue with its next answer:
    the chat template over all turns (as encode_prompt of messages), or plain_transcript."""
    if chat_template:
        return encode_prompt(tokenizer, messages, True)
    return encode_prompt(tokenizer, plain_transcript(messages), False)


def encode_completion(tokenizer, text: str) -> list[int]:
    """Token ids of a response continuation (no bos) followed by eos.

    For the tiny tokenizer encode_prompt(p) + encode_completion(d)[:-1] equals
    encode_prompt(p + d) exactly; for BPE models joining the two lists is the
    usual approximation (a token may straddle the boundary in p + d).
    """
    if tokenizer.eos_token_id is None:
        raise ModelError("the tokenizer has no eos token, so completions cannot be terminated")
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
