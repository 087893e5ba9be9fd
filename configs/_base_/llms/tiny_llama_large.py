# tiny_llama at 1.5x width and 2x depth (4 layers, hidden 192) for CPU sweeps.
llm = dict(
    type='HFCausalLM',
    config=dict(model_type='llama', hidden_size=192, num_hidden_layers=4, num_attention_heads=6,
                num_key_value_heads=6, intermediate_size=512, vocab_size=256, rope_theta=10000.0,
                max_position_embeddings=512, tie_word_embeddings=False),
    attn_implementation='eager',
)
tokenizer = dict(pretrained='data/synthetic/tokenizer')
template = 'vicuna_v1'
