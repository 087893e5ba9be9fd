# Vicuna-7B v1.5 (Llama-2 based), 6.738 B parameters.
# Architecture values from REFERENCE.md §2: `mllm inspect` builds the model from them on
# the meta device (no download); training loads `pretrained` from local files only.
llm = dict(
    type='HFCausalLM',
    pretrained='lmsys/vicuna-7b-v1.5',
    config=dict(model_type='llama', hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, intermediate_size=11008, vocab_size=32000, rope_theta=10000.0,
                max_position_embeddings=4096, tie_word_embeddings=False),
    torch_dtype='bfloat16',
)
tokenizer = dict(pretrained='lmsys/vicuna-7b-v1.5')
template = 'vicuna_v1'
