"""Generation: sampling, the generation loop, chat sessions and their saved form."""
