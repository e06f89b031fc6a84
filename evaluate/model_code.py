"""The file MLflow runs to rebuild the champion's ``pyfunc`` model when it is loaded ("models from code").

``evaluate.model_save.save_model_package`` hands this file, not a pickled object, to MLflow: a model
then loads by importing this package, never by unpickling code stored with it.
"""

import mlflow

from mbu.evaluate.packaged import MaskModel

mlflow.models.set_model(MaskModel())
