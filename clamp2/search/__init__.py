"""Search and evaluation on features, behind ``semantic_search/*.py`` (SPEC §9).

    feature_store  a folder of ``[1, D]`` ``.npy`` files or a packed index: reading, checking, building
    retrieval      cosine search, MRR / Hit@K, pairwise and mean-vector scores
    fmd            Fréchet Music Distance between two feature sets
    zero_shot      zero-shot classification by label prompts
    raw_files      search and metrics straight from raw files, through the API and its cache
    clamp3         CLaMP 3's one-command tools: modality detection, keys, score, eval, search
    captions       images → BLIP captions → text (CLaMP 3's image queries)
"""
