"""Run by a PyTorch interpreter (not collected by pytest): loads an exported folder with the real library and
writes its image and text embeddings of the given inputs.

    python pytorch_embed.py {hf|openclip} FOLDER INPUTS.npz OUTPUTS.npz

INPUTS.npz holds `images` [N, 3, H, W] (normalised pixels, NCHW) and `token_ids` [N, L].
"""

import sys

import numpy as np
import torch


def main(kind: str, folder: str, inputs_path: str, outputs_path: str) -> None:
    inputs = np.load(inputs_path)
    images = torch.from_numpy(inputs["images"])
    token_ids = torch.from_numpy(inputs["token_ids"]).long()
    with torch.no_grad():
        if kind == "hf":
            from transformers import CLIPModel

            model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
            image = model.get_image_features(pixel_values=images)
            text = model.get_text_features(input_ids=token_ids, attention_mask=(token_ids > 0).long())
            image = getattr(image, "pooler_output", image)
            text = getattr(text, "pooler_output", text)
            scale, bias = model.logit_scale, torch.tensor(float("nan"))
        else:
            import open_clip

            model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
            model.eval()
            image, text = model.encode_image(images), model.encode_text(token_ids)
            scale = model.logit_scale
            bias = model.logit_bias if getattr(model, "logit_bias", None) is not None else torch.tensor(float("nan"))
            tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(["a photo of a red cube."])
            np.save(outputs_path + ".tokens.npy", tokens.numpy())
    np.savez(outputs_path, image_features=image.numpy(), text_features=text.numpy(),
             logit_scale=scale.detach().numpy(), logit_bias=bias.detach().numpy())


if __name__ == "__main__":
    main(*sys.argv[1:])
