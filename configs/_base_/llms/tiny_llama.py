# A tiny random-init Llama-style LLM (2 layers, hidden 128) for CPU demos and tests; its
# word-level tokenizer is written next to the synthetic data (vocab < 256).
llm = dict(
    type='HFCausalLM',
    config=dict(model_type='llama', hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, intermediate_size=352, vocab_size=256, rope_theta=10000.0,
                max_position_embeddings=512, tie_word_embeddings=False),
    attn_implementation='eager',
)
tokenizer = dict(pretrained='data/synthetic/tokenizer')
template = 'vicuna_v1'
