"""odeify: continuous-depth (neural-ODE) transformers from GPT-2 and Llama models.

from odeify import odeify
model = odeify(model)                    # L blocks -> one ODE block, exact at L steps
with odeify.steps(model, 6): model(ids)  # retarget depth
plain = odeify.materialize(model, 18)    # back to a stock model with 18 layers
model = odeify("folder-or-hub-id")       # a stock checkpoint, streamed layer by layer
odeify.calibrate(model, steps=[6], data=ids)  # a schedule that makes 6 steps work
odeify.compile(model)                    # one compiled step for every step count
"""

from .api import get_block, materialize, odeify, set_steps, steps
from .calibrate import calibrate
from .config import ODEConfig
from .io import from_pretrained, save_pretrained
from .lora import lora_config
from .models import register_auto_classes
from .regional import compile
from .schedule import Schedule
from .streaming import convert

# The sanctioned exception to "importing odeify changes nothing outside it": the odeify config
# and model classes are registered with transformers' Auto classes (their public register API),
# so AutoModelForCausalLM.from_pretrained loads a saved odeified model as one.
register_auto_classes()

__version__ = "0.1.0"

# `from odeify import odeify` gives the function; the other verbs hang off it too.
for _name, _fn in {
    "steps": steps,
    "calibrate": calibrate,
    "compile": compile,
    "set_steps": set_steps,
    "materialize": materialize,
    "get_block": get_block,
    "from_pretrained": from_pretrained,
    "save_pretrained": save_pretrained,
    "lora_config": lora_config,
    "convert": convert,
}.items():
    setattr(odeify, _name, _fn)

__all__ = [
    "ODEConfig",
    "Schedule",
    "calibrate",
    "compile",
    "convert",
    "from_pretrained",
    "get_block",
    "materialize",
    "odeify",
    "save_pretrained",
    "set_steps",
    "steps",
]
