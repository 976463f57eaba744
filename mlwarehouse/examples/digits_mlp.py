"""Task script of the demo: train an MLP on the digits dataset stored in the warehouse.

Run by a worker, like a TensorHub task script: the hyper-parameters ``n_hidden``, ``lr``, ``epochs`` and
``seed`` arrive as global variables, and ``test_accuracy`` (a saved result key) is read back from the globals
when the script ends. Logs and models saved here link to the task's run.

Loaded arrays are zero-copy, read-only views of the stored bytes, which ``torch.from_numpy`` warns about ("The
given NumPy array is not writable"); ``writable=True`` loads arrays that own writable memory, as training wants.
"""

import torch
from torch import nn

import mlwarehouse

wh = mlwarehouse.connect()  # inside a worker: the worker's warehouse and project
run = mlwarehouse.current_run()
X_train, y_train, X_valid, y_valid, X_test, y_test = wh.datasets.load(name="digits", writable=True)

torch.manual_seed(seed)
model = nn.Sequential(nn.Linear(64, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_hidden), nn.ReLU(),
                      nn.Linear(n_hidden, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=lr)
loss_fn = nn.CrossEntropyLoss()
Xt, yt = torch.from_numpy(X_train), torch.from_numpy(y_train)


def accuracy(X, y):
    with torch.no_grad():
        return float((model(torch.from_numpy(X)).argmax(1).numpy() == y).mean())


step = 0
for epoch in range(epochs):
    model.train()
    order = torch.randperm(len(Xt))
    for start in range(0, len(Xt), 64):
        idx = order[start:start + 64]
        optimizer.zero_grad()
        loss = loss_fn(model(Xt[idx]), yt[idx])
        loss.backward()
        optimizer.step()
        run.log("train", step=step, epoch=epoch, loss=loss.item())
        step += 1
    model.eval()
    valid_accuracy = accuracy(X_valid, y_valid)
    with torch.no_grad():
        valid_loss = loss_fn(model(torch.from_numpy(X_valid)), torch.from_numpy(y_valid)).item()
    run.log("valid", step=step, epoch=epoch, loss=valid_loss, accuracy=valid_accuracy)
    wh.models.checkpoint(model, name="digits-mlp-ckpt", run=run.id, epoch=epoch,
                         metrics={"valid_accuracy": valid_accuracy}, keep_last=2, keep_best=1,
                         best_metric="valid_accuracy", example_inputs=(Xt[:2],))

test_accuracy = accuracy(X_test, y_test)
run.log("test", step=step, accuracy=test_accuracy)
wh.models.save(model, name="digits-mlp", test_accuracy=test_accuracy, valid_accuracy=valid_accuracy,
               n_hidden=n_hidden, lr=lr, epochs=epochs, dataset=wh.datasets.find(name="digits", limit=1)[0].id,
               example_inputs=(Xt[:2],))
print(f"n_hidden={n_hidden} lr={lr}: test accuracy {test_accuracy:.4f}")
