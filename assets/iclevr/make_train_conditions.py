"""150 label sets drawn from the i-CLEVR train.json (seeded): the conditions ganscope's
recipes and checkpoints are selected on, never test.json / new_test.json.

    python3 assets/iclevr/make_train_conditions.py ../shared/data/iclevr/train.json \
        > assets/iclevr/train_conditions_150.json
"""
import json
import random
import sys

items = list(json.load(open(sys.argv[1])).items())
random.seed(0)
print(json.dumps([labels for _, labels in random.sample(items, 150)]))
