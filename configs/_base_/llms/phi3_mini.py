# Phi-3-mini-4k-instruct, 3.821 B parameters.
# Architecture values from REFERENCE.md §2: `mllm inspect` builds the model from them on
# the meta device (no download); training loads `pretrained` from local files only.
llm = dict(
    type='HFCausalLM',
    pretrained='microsoft/Phi-3-mini-4k-instruct',
    config=dict(model_type='phi3', hidden_size=3072, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, intermediate_size=8192, vocab_size=32064, rope_theta=10000.0,
                max_position_embeddings=4096, tie_word_embeddings=False),
    torch_dtype='bfloat16',
)
tokenizer = dict(pretrained='microsoft/Phi-3-mini-4k-instruct')
template = 'phi3_chat'
