# Yi-1.5-34B-Chat, 34.389 B parameters; ChatML template (XTuner's qwen_chat).
# Architecture values from REFERENCE.md §2: `mllm inspect` builds the model from them on
# the meta device (no download); training loads `pretrained` from local files only.
llm = dict(
    type='HFCausalLM',
    pretrained='01-ai/Yi-1.5-34B-Chat',
    config=dict(model_type='llama', hidden_size=7168, num_hidden_layers=60, num_attention_heads=56,
                num_key_value_heads=8, intermediate_size=20480, vocab_size=64000, rope_theta=5000000.0,
                max_position_embeddings=4096, tie_word_embeddings=False),
    torch_dtype='bfloat16',
)
tokenizer = dict(pretrained='01-ai/Yi-1.5-34B-Chat')
template = 'chatml'
