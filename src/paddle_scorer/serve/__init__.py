"""`paddle-scorer serve`: an OpenAI-compatible completions server over one loaded model.

* :mod:`.protocol` - request validation and response shapes (pure: no model, no HTTP);
* :mod:`.codec` - the tokenizer as the server uses it (classify's encoding rule, text per token);
* :mod:`.engine` - the one thread that runs the model: batches requests that arrive together;
* :mod:`.service` - a request in, a response out (protocol + codec + engine);
* :mod:`.app` - the FastAPI routes, authentication, body limits, OpenAI-shaped errors.
"""
