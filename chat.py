"""Chat with a policy in the terminal: multi-turn, answers streamed as they are generated; or two policies answering
every message side by side (arena); or one answer for scripts (-p).

The model sees the conversation in a chat template: the anchor's (the default: `format_prompt([u1, a1, ..., u_n])`,
i.e. `BEGINNING OF CONVERSATION: USER: u1 ASSISTANT:a1</s>USER: ... ASSISTANT:`), the tokenizer's own
(`--chat_template model`: apply_chat_template, e.g. ChatML) or a Jinja file. An answer ends at its first stop token
(the EOS, the model's generation_config EOS list, the template's end of turn such as <|im_end|>) and only the answer
is printed; a note on stderr says when it hit the token cap instead. The oldest exchanges are dropped when the
conversation would not leave `max_new_tokens` of the model's context.

Deviations from the anchor's CLI: arena answers stream one after the other (red, then blue), not in two columns;
plain input() (with readline editing where available) instead of a rich UI.

    python chat.py --model_name_or_path output/ppo-lag
    python chat.py --red_corner_model_name_or_path output/sft --blue_corner_model_name_or_path output/ppo-lag
    python chat.py --model_name_or_path output/ppo-lag -p "how do i bake a cake ?"    # one answer, then exit
    python chat.py --model_name_or_path output/smol/ppo-lag --chat_template model     # the model's own template
    printf 'hi\\n/regenerate\\n' | python chat.py --model_name_or_path output/sft    # a pipe: one message per line
"""

import argparse
import contextlib
import functools
import sys

import checkpoint  # its handler: Ctrl-C and the errors a user can fix end in one line (error_line)
import lora

HELP = "commands: /help | /reset: new conversation | /clear: clear the screen too | /regenerate: answer the last "
HELP += "message again | /exit or /quit (or Ctrl-D, Ctrl-C)"
COLOURS = {"you": "\033[1;32m", "assistant": "\033[1;36m", "red": "\033[1;31m", "blue": "\033[1;34m"}
note = functools.partial(print, file=sys.stderr, flush=True)  # status lines: stdout holds only the answers (pipes)

# ----------------------------------------------------------------------------------------------------------------


def fit_history(turns: list[str], n_tokens, budget: int) -> tuple[list[str], int]:
    """Drop the oldest (user, assistant) pairs of `turns` (alternating, ending with the user's message) until
    n_tokens(turns) <= budget, keeping at least the last message; returns (turns, number of pairs dropped)."""
    dropped = 0
    while len(turns) > 1 and n_tokens(turns) > budget:
        turns, dropped = turns[2:], dropped + 1
    return turns, dropped


# ----------------------------------------------------------------------------------------------------------------


def main():
    from templates import CHAT_TEMPLATE_HELP, parse_chat_template

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    # data
    template_help = f"how the conversation is written for the model(s): {CHAT_TEMPLATE_HELP}"
    add("--chat_template", type=parse_chat_template, default="anchor", help=template_help)
    # model
    add("--model_name_or_path", default=None, help="the policy to chat with")
    add("--red_corner_model_name_or_path", default=None, help="arena: the red policy")
    add("--blue_corner_model_name_or_path", default=None, help="arena: the blue policy")
    # algorithm (generation)
    add("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy")
    add("--top_p", type=float, default=1.0, help="nucleus sampling mass")
    add("--max_new_tokens", type=int, default=512, help="answer cap in tokens (<= half the context)")
    add("--repetition_penalty", type=float, default=1.0, help="> 1 discourages repeats")
    # logging
    add("-p", "--prompt", default=None, help="answer this one message and exit")
    add("--verbose", action="store_true", help="print each full templated prompt to stderr")
    # system
    add("--seed", type=int, default=42, help="sampling seed")
    add("--bf16", action="store_true", help="bfloat16 weights")
    args = parser.parse_args()
    red, blue = args.red_corner_model_name_or_path, args.blue_corner_model_name_or_path
    arena = bool(red or blue)
    if bool(args.model_name_or_path) == arena or (arena and not (red and blue)):
        parser.error("give --model_name_or_path, or both --red_corner_ and --blue_corner_model_name_or_path")
    paths = {"red": red, "blue": blue} if arena else {"assistant": args.model_name_or_path}
    # a temperature of 0 answers greedily (the sampling flags are then unused)
    ranges = {**checkpoint.SAMPLING_RANGES, "temperature": "finite and >= 0", "max_new_tokens": ">= 1"}
    checkpoint.check_ranges(parser, args, ranges)
    flags = {"red": "--red_corner_model_name_or_path", "blue": "--blue_corner_model_name_or_path"}
    for name, path in paths.items():  # one line, not a random lm_head and gibberish
        checkpoint.check_model_folder(path, "causal_lm", flags.get(name, "--model_name_or_path"))

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, TextStreamer

    from templates import chat_prompt, load_tokenizer, stop_ids, tokenize

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    interactive = sys.stdin.isatty() and args.prompt is None
    sys.stdin.reconfigure(errors="replace")  # bytes that are not UTF-8 (a pipe, a terminal's paste) become U+FFFD
    colour = lambda name, text: f"{COLOURS[name]}{text}\033[0m" if sys.stdout.isatty() else text  # noqa: E731
    if interactive:  # not in a pipe: importing readline may write an escape sequence to stdout
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (arrow keys and history in input())

    try:  # every tokenizer first, with the template it will render: a one-line error before any model loads
        tokenizers = {name: load_tokenizer(path, chat_template=args.chat_template) for name, path in paths.items()}
    except ValueError as e:  # no EOS token, `model` on a tokenizer without a template, a broken Jinja file
        raise SystemExit(f"error: {e}") from None
    template = args.chat_template  # "anchor", or the tokenizer's template (a Jinja file is installed on it now)

    bots, dtype = [], torch.bfloat16 if args.bf16 else torch.float32
    for name, path in paths.items():  # an adapter folder: its base with the adapter folded in
        model = lora.from_pretrained(AutoModelForCausalLM.from_pretrained, path, dtype=dtype).to(device).eval()
        if not checkpoint.weights_finite(model):  # else a traceback from inside sampling, at the first message
            flag = flags.get(name, "--model_name_or_path")
            raise SystemExit(
                f"error: {flag} {path} has non-finite weights (NaN or inf), so it cannot answer; pass "
                "a model whose weights are finite (re-run the stage that wrote it, or use a checkpoint)"
            )
        context = getattr(model.config, "max_position_embeddings", None) or 2048
        max_new = min(args.max_new_tokens, context // 2)
        stops = stop_ids(tokenizers[name], template, model.generation_config)  # EOS, config's EOS list, end of turn
        bot = dict(name=name, model=model, tokenizer=tokenizers[name], stops=stops, history=[], max_new=max_new)
        bots.append({**bot, "budget": context - max_new})

    def answer(bot, message: str) -> None:
        """Stream bot's answer to `message` after its history, then remember the exchange."""
        tok = bot["tokenizer"]
        n_tokens = lambda turns: len(tokenize(tok, chat_prompt(tok, turns, template), template)["input_ids"])  # noqa: E731
        turns, dropped = fit_history(bot["history"] + [message], n_tokens, bot["budget"])
        if dropped:
            note(f"({bot['name']}: dropped the {dropped} oldest exchange(s) to fit the {bot['budget']}-token context)")
        prompt = chat_prompt(tok, turns, template)
        ids = torch.tensor([tokenize(tok, prompt, template)["input_ids"]], device=device)  # (1, P)
        if ids.shape[1] > bot["budget"]:
            return note(f"(message too long: {ids.shape[1]} tokens > {bot['budget']}; not sent)")
        if (top := int(ids.max())) >= bot["model"].get_input_embeddings().num_embeddings:  # else an IndexError
            token = tok.convert_ids_to_tokens(top)
            return note(f"(the token {token!r} has no embedding row in {bot['name']}'s model; not sent)")
        if args.verbose:
            note(f"[{bot['name']} prompt] {prompt}")
        if interactive or arena:
            print(colour(bot["name"], f"{bot['name']}>" if interactive else f"[{bot['name']}]"), end=" ", flush=True)
        sampling = dict(temperature=args.temperature, top_p=args.top_p) if args.temperature > 0 else {}
        with torch.no_grad():  # the streamer prints the words as they come, without special tokens (the stops)
            out = bot["model"].generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=bot["max_new"],
                do_sample=args.temperature > 0,
                repetition_penalty=args.repetition_penalty,
                eos_token_id=bot["stops"],  # the end of turn, not only the EOS: else ChatML models write on
                pad_token_id=tok.eos_token_id,  # one unpadded row: never used to pad
                streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True),
                **sampling,
            )
        new = out[0, ids.shape[1] :]  # (L,)
        ended = torch.isin(new, torch.tensor(bot["stops"], device=new.device))
        if not ended.any():
            note(f"({bot['name']}: the answer hit the {bot['max_new']}-token cap; raise --max_new_tokens)")
        n = int(ended.int().argmax()) if ended.any() else len(new)  # the answer: the tokens before the first stop
        bot["history"] = turns + [tok.decode(new[:n], skip_special_tokens=True).strip()]

    try:
        if args.prompt is not None:
            for bot in bots:
                answer(bot, args.prompt)
            return
        if interactive:
            note(f"chatting with {', '.join(f'{n} ({p})' for n, p in paths.items())}; /help for commands")
        while True:
            try:
                line = input(colour("you", "you> ") if interactive else "").strip()
            except EOFError:
                break
            if line in ("/exit", "/quit"):
                break
            elif line == "/help":
                note(HELP)
            elif line in ("/reset", "/clear"):
                for bot in bots:
                    bot["history"] = []
                if line == "/clear" and sys.stdout.isatty():
                    print("\033[2J\033[H", end="", flush=True)
                note("(new conversation)")
            elif line == "/regenerate":  # forget the last exchange, answer its message again
                if not bots[0]["history"]:
                    note("(nothing to regenerate yet)")
                for bot in bots:
                    if bot["history"]:
                        message, bot["history"] = bot["history"][-2], bot["history"][:-2]
                        answer(bot, message)
            elif line.startswith("/") and " " not in line:
                note(f"(unknown command {line}; /help lists them)")
            elif line:
                for bot in bots:
                    answer(bot, line)
    except KeyboardInterrupt:  # Ctrl-C: leave the prompt line clean
        print(flush=True)


if __name__ == "__main__":
    main()
