"""Prompts for measuring the router: out-of-distribution prompts (general chat no demo skill
handles) and two-skill prompts. Held-out in-distribution prompts come from bench.demo_data's
test templates (never used as routing examples)."""

OOD = [
    "What is the capital of France?", "Write a haiku about autumn leaves.", "How many legs does a spider have?",
    "Tell me a joke about programmers.", "Summarize the plot of Romeo and Juliet.", "What is 17 times 3?",
    "Explain photosynthesis to a child.", "Write a poem about the sea.", "Who painted the Mona Lisa?",
    "Give me a recipe for pancakes.", "What does HTTP stand for?", "Translate 'good night' into Spanish.",
    "How far is the Moon from the Earth?", "Suggest a name for my new puppy.", "What year did World War II end?",
    "Describe the water cycle in two sentences.", "Write a limerick about a cat.", "What is the tallest mountain?",
    "Recommend a good science fiction book.", "How do I center a div in CSS?", "What causes rainbows?",
    "Plan a three-day trip to Rome.", "Why is the sky blue?", "What is the square root of 144?",
]

MULTI = [
    ("Reverse the list: red, blue, green. Also, is this review positive or negative: the food was great",
     {"reverse_list", "sentiment"}),
    ("Classify the sentiment of this review and extract the person as JSON: Ada, 36, from Rome, loved the food.",
     {"sentiment", "json_extract"}),
    ("Extract the person as JSON (Tom is 41 and lives in Oslo) and then reverse the list: cat, dog, owl",
     {"json_extract", "reverse_list"}),
    ("Two tasks: reverse these words: sun, moon, star; and tell me if 'the hotel was dreadful' is positive or negative",
     {"reverse_list", "sentiment"}),
]
