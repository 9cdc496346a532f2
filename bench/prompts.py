"""The fixed prompt set: story openings of varied length, as the default model was trained on."""

PROMPTS = [
    "Once upon a time",
    "The little dog ran to the park and",
    "One day, Lily went to the market with her mother. She saw",
    "Tom and his friend Ben wanted to build a big tower out of blocks, but",
    "In the morning",
    "The sun was shining and the birds were singing when",
    "She looked at the old map and said,",
    "A big red ball rolled down the hill. The children",
    "The cat said",
    "After school, Ben found a small box under his bed. Inside the box there was",
    "There was a small house near the river where a kind old man lived. Every day he",
    "Mia liked to paint pictures of the sky.",
    "The bird flew over the garden and",
    "It was a rainy day, so Max and his sister stayed inside and",
    "Grandma made a cake for the party. Everyone",
    "The boy and the girl",
]
