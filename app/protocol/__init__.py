"""Request and response models per API dialect (TGI, OpenAI), each with `to_sampling_params`."""
