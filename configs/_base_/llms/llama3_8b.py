# Llama-3-8B-Instruct, 8.030 B parameters.
# Architecture values from REFERENCE.md §2: `mllm inspect` builds the model from them on
# the meta device (no download); training loads `pretrained` from local files only.
llm = dict(
    type='HFCausalLM',
    pretrained='meta-llama/Meta-Llama-3-8B-Instruct',
    config=dict(model_type='llama', hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
                max_position_embeddings=8192, tie_word_embeddings=False),
    torch_dtype='bfloat16',
)
tokenizer = dict(pretrained='meta-llama/Meta-Llama-3-8B-Instruct')
template = 'llama3_chat'
