"""The wire forms of a model's tensors: request bodies to numpy arrays, output arrays to response
bodies. ``tensors`` (what the forms share), ``short`` (the short form), ``oip_json`` (the Open
Inference Protocol's JSON document) and ``oip_binary`` (its binary tensor data extension)."""
