"""Stage 2: contrastive fine-tuning with MultipleNegativesRankingLoss: pairs, hard negatives, training, the model card."""
