"""The project's sentence set for the embedding task: pairs of paraphrases on distinct topics.

Written for ox-quant. Each pair's two sentences say the same thing in different words;
pairs differ in topic, so a good embedding puts each sentence nearest its partner.
"""

PARAPHRASE_PAIRS: tuple[tuple[str, str], ...] = (
    ("A man is playing a guitar on the stage.", "Someone performs a song on an acoustic guitar in front of an audience."),
    ("The stock market fell sharply on Monday morning.", "Share prices dropped steeply at the start of the week."),
    ("She is baking bread in the kitchen.", "A woman is making a loaf in her oven at home."),
    ("The train to the city was delayed by an hour.", "Our railway journey into town ran sixty minutes late."),
    ("Heavy rain flooded the streets of the village.", "The town's roads were under water after the storm."),
    ("The child is reading a book about dinosaurs.", "A young kid looks through a story about prehistoric reptiles."),
    ("He repaired the flat tyre on his bicycle.", "The man fixed the punctured wheel of his bike."),
    ("The doctor prescribed antibiotics for the infection.", "A physician gave her medicine to treat the bacterial illness."),
    ("Two dogs are chasing a ball across the park.", "A pair of puppies run after a toy on the grass."),
    ("The company announced record profits this year.", "The firm reported its highest earnings ever for the year."),
    ("Please close the window, it is getting cold.", "Could you shut the window? The room is chilly."),
    ("The astronauts returned safely from the space station.", "The crew came back to Earth unharmed after their orbital mission."),
)


def sentences() -> list[str]:
    """All sentences, partners adjacent: indices ``2i`` and ``2i + 1`` form pair ``i``."""
    return [s for pair in PARAPHRASE_PAIRS for s in pair]
