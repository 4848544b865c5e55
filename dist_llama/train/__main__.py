from dist_llama.train.cli import run

run()
